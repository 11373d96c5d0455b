"""A tiny randomly initialised Llama with a byte-level tokenizer, built in code for tests.

Nothing is read from disk or the network: the tokenizer maps every byte to its own token
(BPE with no merges) and the weights come from a fixed seed, so every load is identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from models.backends.causal_lm import CausalLM
from models.registry import ModelSpec

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyLlamaConfig:
    """Hyperparameters of the test model (vocabulary: 256 bytes + SPECIAL_TOKENS)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    # Wider than the usual 0.02 so that logits are peaked enough for greedy decoding to
    # have clear winners (no near-ties that float noise could flip).
    init_std: float = 0.2
    seed: int = 0


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, used by the ByteLevel steps."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: token id == byte value, special tokens from 256 on.

    Returns:
        A fast tokenizer with a ChatML chat template, eos "<|im_end|>", pad "<|pad|>".
    """
    byte_symbols = _bytes_to_unicode()
    vocab = {byte_symbols[byte]: byte for byte in range(256)}
    vocab.update({token: 256 + index for index, token in enumerate(SPECIAL_TOKENS)})
    backend = Tokenizer(BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_model(
    config: TinyLlamaConfig, vocab_size: int, eos_token_id: int, pad_token_id: int
) -> LlamaForCausalLM:
    """Deterministically initialised tiny Llama on CPU in float32.

    Args:
        config: Hyperparameters and seed.
        vocab_size: Tokenizer size.
        eos_token_id: Id of the end-of-turn token.
        pad_token_id: Id of the padding token.

    Returns:
        The model in eval mode.
    """
    llama_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )
    # fork_rng keeps transformers' own init from consuming the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(llama_config)
    # Re-draw every weight from our own generator so that the values do not depend on
    # transformers' init scheme; norm scales (1-D) stay at 1.
    generator = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.ndim >= 2:
                parameter.normal_(0.0, config.init_std, generator=generator)
            else:
                parameter.fill_(1.0)
    return model.eval()


def load(spec: ModelSpec, *, cache_dir: Path, device: str, dtype: torch.dtype) -> CausalLM:
    """Build the tiny test model; `cache_dir` is unused.

    Args:
        spec: Registry entry ("tiny-random-llama").
        cache_dir: Ignored; nothing is cached.
        device: Torch device string.
        dtype: Torch dtype for the weights.

    Returns:
        A `CausalLM` around the tiny model.
    """
    tokenizer = build_tokenizer()
    model = build_model(
        TinyLlamaConfig(
            max_position_embeddings=spec.context_length,
        ),
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = model.to(device=device, dtype=dtype)  # type: ignore[call-arg]  # wrapped .to
    return CausalLM(
        model, tokenizer, name=spec.name, device=device, context_length=spec.context_length
    )
