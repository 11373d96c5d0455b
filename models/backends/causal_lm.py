"""Runtime wrapper around a causal language model: prompt encoding and our own decoding loop.

Decoding runs one forward pass per token over a KV cache (models/backends/decoding.py)
instead of calling `model.generate`, so that cancellation, stop strings and streaming are
checked between every two tokens, and so that sequences can share a batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from models.backends import packed_linear
from models.backends.decoding import (
    BatchDecoder,
    DecodeRequest,
    GenerationOutput,
    SamplingParams,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CHAT_ROLES = ("system", "user", "assistant")
FINISH_REASONS = ("stop", "length", "cancelled")


class CausalLM:
    """A causal LM and its tokenizer on one device, with incremental KV-cache decoding.

    On a CPU the model's float32 linear layers are swapped, in place, for oneDNN's on
    prepacked weights (models/backends/packed_linear.py): decoding steps run faster, and
    a sequence's logits no longer depend on what shares its batch.

    Args:
        model: A transformers causal LM in eval mode, already on `device`; used for
            inference only from here on.
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
        if torch.device(device).type == "cpu":
            packed_linear.pack_linears(model)
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.context_length = context_length
        self.vocab_size = int(model.config.vocab_size)
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        # Job threads encode while the engine thread decodes with the same tokenizer.
        self.tokenizer_lock = threading.Lock()

    def encode_prompt(self, text: str) -> list[int]:
        """Tokenize raw text (no chat template).

        Args:
            text: Prompt text.

        Returns:
            Token ids, with whatever special tokens the tokenizer adds by default.
        """
        with self.tokenizer_lock:
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
        with self.tokenizer_lock:
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
        """Continue `prompt_ids` one token at a time, alone.

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
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop if isinstance(stop, str) else tuple(stop),  # type: ignore[arg-type]
        )
        decoder = self.decoder(max_batch=1)
        decoder.add(
            self.request(prompt_ids, params, should_cancel=should_cancel, on_token=on_token)
        )
        while True:
            for _request, output in decoder.step():
                return output

    def request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        should_cancel: Callable[[], bool] | None = None,
        on_token: Callable[[str], None] | None = None,
    ) -> DecodeRequest:
        """A checked request for a `BatchDecoder` of this model.

        Raises:
            ValueError: The prompt or the params do not fit this model.
        """
        self._check_generate_args(
            prompt_ids,
            params.max_new_tokens,
            params.temperature,
            params.top_p,
            params.seed,
            params.stop,
        )
        return DecodeRequest(
            list(prompt_ids), params, should_cancel=should_cancel, on_token=on_token
        )

    def decoder(self, *, max_batch: int, max_prefill_tokens: int = 4096) -> BatchDecoder:
        """A continuous-batching decoder over this model (see models/backends/decoding.py)."""
        return BatchDecoder(
            self.model,
            self.tokenizer,
            device=self.device,
            eos_token_ids=self.eos_token_ids,
            max_batch=max_batch,
            max_prefill_tokens=max_prefill_tokens,
            tokenizer_lock=self.tokenizer_lock,
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
