"""Runtime wrapper around a causal language model: prompt encoding and our own decoding loop.

The loop runs one forward pass per token over a KV cache instead of calling `model.generate`,
so that cancellation, stop strings and streaming are checked between every two tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from transformers import DynamicCache

from models.backends.sampling import sample_next_token

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CHAT_ROLES = ("system", "user", "assistant")
FINISH_REASONS = ("stop", "length", "cancelled")
# Prompt tokens decoded in front of the completion so that tokenizers which drop a leading
# space when decoding a sequence's first token (SentencePiece) still stream it; the same
# trick as text-generation-inference's incremental detokenizer.
_DETOKENIZE_CONTEXT = 5
_REPLACEMENT_CHAR = "\ufffd"


@dataclass
class GenerationOutput:
    """Result of `CausalLM.generate`.

    Attributes:
        text: Completion text, without the stop string or EOS token that ended it.
        token_ids: Every token sampled, including a final EOS token and the tokens that
            spelled a stop string.
        prompt_tokens: Number of prompt tokens.
        completion_tokens: len(token_ids).
        finish_reason: "stop" (EOS or a stop string), "length" (max_new_tokens reached) or
            "cancelled" (should_cancel returned True).
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class _TextAssembler:
    """Turns sampled token ids into text, streaming only what is final.

    Text is released once it is complete UTF-8 (a byte-level token may carry half a
    character) and once it can no longer turn out to be the start of a stop string.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        context_ids: list[int],
        stop: Sequence[str],
        on_token: Callable[[str], None] | None,
    ) -> None:
        self._tokenizer = tokenizer
        self._ids = list(context_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = tuple(stop)
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._on_token = on_token
        self._emitted = 0
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> bool:
        """Append one token; returns True when the text now contains a stop string."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return False
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._append(new_text[len(prefix_text) :])

    def finish(self) -> str:
        """Flush pending text (an incomplete character decodes to U+FFFD) and return it all."""
        if not self.stopped:
            prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
            self._append(self._decode(self._ids[self._prefix_offset :])[len(prefix_text) :])
        self._emit(len(self.text))
        return self.text

    def _decode(self, ids: list[int]) -> str:
        return cast(str, self._tokenizer.decode(ids, skip_special_tokens=True))

    def _append(self, delta: str) -> bool:
        if not delta:
            return False
        # Only a stop string overlapping the new delta can be new.
        search_from = max(0, len(self.text) - self._max_stop_len + 1)
        self.text += delta
        hits = [i for i in (self.text.find(s, search_from) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            self._emit(len(self.text))
            return True
        self._emit(len(self.text) - self._stop_prefix_length())
        return False

    def _stop_prefix_length(self) -> int:
        """Length of the longest end of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def _emit(self, end: int) -> None:
        if end > self._emitted:
            if self._on_token is not None:
                self._on_token(self.text[self._emitted : end])
            self._emitted = end


class CausalLM:
    """A causal LM and its tokenizer on one device, with incremental KV-cache decoding.

    Args:
        model: A transformers causal LM in eval mode, already on `device`.
        tokenizer: Its tokenizer; must have a chat template for `encode_chat`.
        name: Public model name.
        device: Torch device string the model lives on.
        context_length: Maximum prompt + completion tokens.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str,
        device: str,
        context_length: int,
    ) -> None:
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.context_length = context_length
        self.vocab_size = int(model.config.vocab_size)
        self.eos_token_ids = _eos_token_ids(model, tokenizer)

    def encode_prompt(self, text: str) -> list[int]:
        """Tokenize raw text (no chat template).

        Args:
            text: Prompt text.

        Returns:
            Token ids, with whatever special tokens the tokenizer adds by default.
        """
        ids: list[int] = self.tokenizer(text)["input_ids"]
        return ids

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Render messages with the model's chat template, ending with the assistant prompt.

        Args:
            messages: Non-empty list of {"role": "system"|"user"|"assistant", "content": str}.

        Returns:
            Token ids of the rendered conversation.
        """
        if not messages:
            raise ValueError("messages must contain at least one message, got []")
        for index, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            if role not in CHAT_ROLES or not isinstance(message.get("content"), str):
                raise ValueError(
                    f"messages[{index}] must be {{'role': one of {CHAT_ROLES}, "
                    f"'content': str}}, got {message!r}"
                )
        rendered = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        # The template already spells out the special tokens; do not add BOS twice.
        ids: list[int] = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        return ids

    def count_tokens(self, text: str) -> int:
        """Number of tokens `encode_prompt(text)` yields.

        Args:
            text: Any text.

        Returns:
            Token count.
        """
        return len(self.encode_prompt(text))

    def generate(
        self,
        prompt_ids: list[int],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        should_cancel: Callable[[], bool] | None = None,
        on_token: Callable[[str], None] | None = None,
    ) -> GenerationOutput:
        """Continue `prompt_ids` one token at a time.

        Args:
            prompt_ids: Non-empty prompt, e.g. from `encode_chat`.
            max_new_tokens: Token budget, >= 1; prompt + budget must fit `context_length`.
            temperature: 0 for greedy decoding, else sampling temperature in (0, 2].
            top_p: Nucleus sampling mass in (0, 1].
            seed: Seed for sampling; same seed and arguments give the same output. None
                draws a random seed.
            stop: Strings that end generation; the returned text excludes them.
            should_cancel: Polled before every token; True ends with "cancelled".
            on_token: Receives text deltas as they become final; they concatenate to `text`.

        Returns:
            A `GenerationOutput`.
        """
        self._check_generate_args(prompt_ids, max_new_tokens, temperature, top_p, seed, stop)
        generator = _make_generator(self.device, seed) if temperature > 0 else None
        assembler = _TextAssembler(
            self.tokenizer,
            context_ids=prompt_ids[-_DETOKENIZE_CONTEXT:],
            stop=stop,
            on_token=on_token,
        )
        token_ids: list[int] = []
        finish_reason = "length"
        cache = DynamicCache(config=self.model.config)
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            while len(token_ids) < max_new_tokens:
                if should_cancel is not None and should_cancel():
                    finish_reason = "cancelled"
                    break
                # logits_to_keep=1: the prefill needs only the last position's logits.
                logits = self.model(
                    input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1
                ).logits[:, -1, :]
                next_token = sample_next_token(
                    logits, temperature=temperature, top_p=top_p, generator=generator
                )
                token_ids.append(int(next_token.item()))
                if token_ids[-1] in self.eos_token_ids or assembler.add(token_ids[-1]):
                    finish_reason = "stop"
                    break
                input_ids = next_token.view(1, 1)
        text = assembler.finish()
        if assembler.stopped and finish_reason == "length":
            finish_reason = "stop"  # the flushed tail completed a stop string
        return GenerationOutput(
            text=text,
            token_ids=token_ids,
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(token_ids),
            finish_reason=finish_reason,
        )

    def _check_generate_args(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: Sequence[str],
    ) -> None:
        if len(prompt_ids) == 0:
            raise ValueError("prompt_ids must contain at least one token, got []")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:
            raise ValueError(
                f"prompt_ids must be in [0, {self.vocab_size}), "
                f"got values from {min(prompt_ids)} to {max(prompt_ids)}"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if len(prompt_ids) + max_new_tokens > self.context_length:
            raise ValueError(
                f"prompt tokens + max_new_tokens must be <= {self.context_length}, got "
                f"{len(prompt_ids)} + {max_new_tokens} = {len(prompt_ids) + max_new_tokens}"
            )
        if not 0.0 <= temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if seed is not None and not 0 <= seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        if isinstance(stop, str) or any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop must be a sequence of non-empty strings, got {stop!r}")


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """EOS ids from the tokenizer and the model's generation config (an int or a list)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(i) for i in configured)
    return frozenset(ids)


def _make_generator(device: str, seed: int | None) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
