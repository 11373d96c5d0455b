"""Continuous batching for a causal LM: sequences join a running batch between two steps
and leave it when they finish, each keeping its own rows of one shared KV cache.

The cache is left-padded: every row's newest token sits in the last column, so one
forward pass advances all rows by one token. A row's own positions (for rotary
embeddings) count only its real tokens, and an attention mask hides the padding, so
a row computes what it would compute alone, up to floating-point rounding of the
batched matrix products. Newcomers are prefilled together (padded to the longest
prompt), then merged into the batch; finished rows are dropped and the columns no
row needs any more are cut off.

This module is pure PyTorch: no threads, no I/O. `CausalLM.generate` runs one
sequence through it; the worker's engine thread runs many.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from models.backends.sampling import sample_next_token

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Prompt tokens decoded in front of the completion so that tokenizers which drop a leading
# space when decoding a sequence's first token (SentencePiece) still stream it; the same
# trick as text-generation-inference's incremental detokenizer.
_DETOKENIZE_CONTEXT = 5
_REPLACEMENT_CHAR = "\ufffd"
# The attention kernels a batch may use on CUDA. cuDNN's, which PyTorch picked for these
# bfloat16 shapes on an H200, is left out: it compiles a graph for each new shape and
# stride, and a running batch's (rows, width) changes on nearly every step. There a
# 32-row step took 101 ms on new shapes against 24 ms on the same shapes again, and a
# lone sequence on the engine's thread 67-78 ms per token against 20-38 ms in-process.
# Flash (no mask) and memory-efficient (mask) attention need no build; math is the
# fallback for what neither takes.
_CUDA_ATTENTION = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is decoded.

    Attributes:
        max_new_tokens: Token budget, >= 1.
        temperature: 0 for greedy decoding, else the sampling temperature in (0, 2].
        top_p: Nucleus sampling mass in (0, 1].
        seed: Seed of the sequence's own random generator; the same seed and params give
            the same tokens whatever else shares the batch. None draws a random seed.
        stop: Strings that end the sequence; its text excludes them.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class GenerationOutput:
    """What a finished sequence produced.

    Attributes:
        text: Completion text, without the stop string or EOS token that ended it.
        token_ids: Every token sampled, including a final EOS token and the tokens that
            spelled a stop string.
        prompt_tokens: Number of prompt tokens.
        completion_tokens: len(token_ids).
        finish_reason: "stop" (EOS or a stop string), "length" (max_new_tokens reached) or
            "cancelled" (should_cancel returned True).
        peak_batch: The most sequences it shared a forward pass with, itself included.
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    peak_batch: int = 1


class TextAssembler:
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


@dataclass(eq=False)
class DecodeRequest:
    """One sequence to decode: its prompt, its params and its callbacks.

    Attributes:
        prompt_ids: Non-empty, already checked against the model's vocabulary and context.
        params: How to decode it.
        should_cancel: Asked before every token; True ends the sequence with "cancelled".
        on_token: Receives text deltas as they become final; they concatenate to the text.
    """

    prompt_ids: list[int]
    params: SamplingParams
    should_cancel: Callable[[], bool] | None = None
    on_token: Callable[[str], None] | None = None


@dataclass(eq=False)
class _Sequence:
    request: DecodeRequest
    assembler: TextAssembler
    generator: torch.Generator | None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    peak_batch: int = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int, eos_token_ids: frozenset[int]) -> None:
        self.token_ids.append(token_id)
        if token_id in eos_token_ids or self.assembler.add(token_id):
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.request.params.max_new_tokens:
            self.finish_reason = "length"

    def output(self) -> GenerationOutput:
        assert self.finish_reason is not None
        text = self.assembler.finish()
        if self.assembler.stopped and self.finish_reason == "length":
            self.finish_reason = "stop"  # the flushed tail completed a stop string
        return GenerationOutput(
            text=text,
            token_ids=self.token_ids,
            prompt_tokens=len(self.request.prompt_ids),
            completion_tokens=len(self.token_ids),
            finish_reason=self.finish_reason,
            peak_batch=max(self.peak_batch, 1),
        )


class _SlotLayer(DynamicLayer):
    """One layer's keys and values: views of buffers that the batch's rows write in place.

    The buffers have room for more rows and columns than the batch uses. `KVBatch` makes
    room before each forward pass and points every layer at the rows and columns in use
    (`show`); a forward pass writes its new columns right after them.

    transformers' DynamicLayer concatenates the whole cache with each new token. Copying
    every row's keys and values whenever a row left or joined, as this class did before,
    took 8% of the engine's time on a CPU under traffic that arrives one request at a time.
    """

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor) -> None:
        super().__init__()
        self.dtype, self.device = key_buffer.dtype, key_buffer.device
        self.is_initialized = True
        self.key_buffer, self.value_buffer = key_buffer, value_buffer
        self.show(0, 0, 0)

    def show(self, rows: int, start: int, end: int) -> None:
        """Make rows [0, rows) and columns [start, end) of the buffers the cache."""
        self._rows, self._start, self._end = rows, start, end
        self.keys = self.key_buffer[:rows, :, start:end]
        self.values = self.value_buffer[:rows, :, start:end]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._end + key_states.shape[-2]
        self.key_buffer[: self._rows, :, self._end : end] = key_states
        self.value_buffer[: self._rows, :, self._end : end] = value_states
        self.show(self._rows, self._start, end)
        return _kv(self)


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad `tensor` on the left of `dim` up to `width` (dim counted from the end)."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (-dim - 1) + [missing, 0]
    return F.pad(tensor, pad)


class KVBatch:
    """The rows of a batch on the device: KV cache, padding mask and next positions.

    Row i of every tensor belongs to the i-th sequence; the caller keeps that order, which
    `keep` reports when rows leave. The cache lives in buffers with spare rows and columns
    (`_SlotLayer`): a step writes one column in place, a newcomer is copied into spare rows,
    a leaving row is overwritten by the last row, and columns that no row needs any more
    are cut off by moving the start of the view. The buffers are reallocated only when
    they run out of room, at most once every `_ROOM` steps and once per doubling of rows.

    Columns a row does not use (its left padding) are hidden by the attention mask. What
    they hold is stale but finite (the buffers start zeroed and only ever receive keys and
    values), so it adds exact zeros to the attention: a row computes what it would compute
    with any other padding.

    Args:
        model: The causal LM.
        device: Torch device string the model lives on.
        max_rows: Rows the batch will hold at most; the buffers never reserve more.
    """

    _ROOM = 64

    def __init__(self, model: PreTrainedModel, device: str, max_rows: int | None = None) -> None:
        self._model = model
        self._device = torch.device(device)
        self._max_rows = max_rows
        self._cache: DynamicCache | None = None
        self._layers: list[_SlotLayer] = []
        self._start = self._end = 0  # columns in use: [start, end)
        self._mask = torch.empty(0, 0, dtype=torch.long, device=self._device)  # (rows, T)
        self._positions = torch.empty(0, dtype=torch.long, device=self._device)  # (rows,)
        self._padded = False
        self._attention: Callable[[], AbstractContextManager[object]] = (
            partial(sdpa_kernel, _CUDA_ATTENTION) if self._device.type == "cuda" else nullcontext
        )

    @property
    def rows(self) -> int:
        return int(self._mask.shape[0])

    @property
    def width(self) -> int:
        """Columns of the cache: the longest row, padding included."""
        return int(self._mask.shape[1])

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Run the prompts as new rows appended to the batch.

        Returns:
            Their last positions' logits, shape (len(prompts), vocab).
        """
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        ids, mask = self._to_device(ids), self._to_device(mask)
        padded = any(len(p) < width for p in prompts)
        cache = DynamicCache(config=self._model.config)
        with self._attention():
            logits = self._model(
                input_ids=ids,
                attention_mask=mask if padded else None,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,  # the prefill needs only the last position's logits
            ).logits[:, -1, :]
        self._append(_layers_of(cache), mask)
        return logits

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token to every row.

        Args:
            tokens: One token id per row, in row order.

        Returns:
            The next logits of every row, shape (rows, vocab).
        """
        self._make_room(self.rows, left=0, right=1)
        mask = F.pad(self._mask, (0, 1), value=1)
        with self._attention():
            logits = self._model(
                input_ids=self._to_device(torch.tensor(tokens, dtype=torch.long).view(-1, 1)),
                attention_mask=mask if self._padded else None,
                position_ids=self._positions.view(-1, 1),
                past_key_values=self._cache,
                use_cache=True,
            ).logits[:, -1, :]
        self._end += 1  # every layer wrote its column there
        self._mask = mask
        self._positions = self._positions + 1
        return logits

    def keep(self, rows: list[int]) -> list[int]:
        """Drop every row not in `rows` (ascending) and the columns no kept row uses.

        Returns:
            For each row of the batch now, the row it was before.
        """
        if len(rows) == self.rows:
            return rows
        if not rows:
            self._reset()
            return []
        count = len(rows)
        kept = set(rows)
        holes = [row for row in range(count) if row not in kept]
        movers = [row for row in rows if row >= count]
        order = list(range(count))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        if holes:
            target = torch.tensor(holes, dtype=torch.long, device=self._device)
            source = torch.tensor(movers, dtype=torch.long, device=self._device)
            for layer in self._layers:
                for buffer in (layer.key_buffer, layer.value_buffer):
                    used = buffer[:, :, self._start : self._end]
                    used[target] = used[source]
        index = torch.tensor(order, dtype=torch.long, device=self._device)
        mask = self._mask.index_select(0, index)
        # Columns that are padding in every kept row lie at the left; cut them off.
        first = int(mask.any(0).to(torch.int8).argmax())
        self._mask = mask[:, first:]
        self._start += first
        self._positions = self._positions.index_select(0, index)
        self._padded = bool((self._mask == 0).any())
        self._show()
        return order

    def _append(self, new_layers: list[DynamicLayer], mask: torch.Tensor) -> None:
        old_rows, old_width = self.rows, self.width
        count, new_width = mask.shape
        width = max(old_width, new_width)
        if self._cache is None:
            self._cache = DynamicCache(config=self._model.config)
            self._layers = [
                _SlotLayer(*(t.new_zeros(0, t.shape[1], 0, t.shape[3]) for t in _kv(layer)))
                for layer in new_layers
            ]
            self._cache.layers = self._layers  # type: ignore[assignment]
        self._make_room(old_rows + count, left=width - old_width, right=0)
        self._start -= width - old_width
        for layer, new in zip(self._layers, new_layers, strict=True):
            new_keys, new_values = _kv(new)
            columns = slice(self._end - new_width, self._end)
            layer.key_buffer[old_rows : old_rows + count, :, columns] = new_keys
            layer.value_buffer[old_rows : old_rows + count, :, columns] = new_values
        self._mask = torch.cat([_left_pad(self._mask, width, -1), _left_pad(mask, width, -1)])
        self._positions = torch.cat([self._positions, mask.sum(-1)])
        self._padded = bool((self._mask == 0).any())
        self._show()

    def _make_room(self, rows: int, *, left: int, right: int) -> None:
        """Reallocate the buffers unless they hold `rows` rows, and `left` free columns
        before the ones in use and `right` after them."""
        buffer = self._layers[0].key_buffer
        capacity_rows, capacity_columns = buffer.shape[0], buffer.shape[2]
        if rows <= capacity_rows and left <= self._start and self._end + right <= capacity_columns:
            return
        if rows > capacity_rows:
            capacity_rows = max(rows, min(2 * capacity_rows, self._max_rows or rows))
        width = self._end - self._start
        columns = slice(left, left + width)
        for layer in self._layers:
            fresh = []
            for old in (layer.key_buffer, layer.value_buffer):
                new = old.new_zeros(
                    capacity_rows, old.shape[1], left + width + right + self._ROOM, old.shape[3]
                )
                new[: self.rows, :, columns] = old[: self.rows, :, self._start : self._end]
                fresh.append(new)
            layer.key_buffer, layer.value_buffer = fresh
        self._start, self._end = left, left + width
        self._show()

    def _show(self) -> None:
        for layer in self._layers:
            layer.show(self.rows, self._start, self._end)

    def _reset(self) -> None:
        self._cache = None
        self._layers = []
        self._start = self._end = 0
        self._mask = self._mask[:0, :0]
        self._positions = self._positions[:0]
        self._padded = False

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._device.type == "cuda":
            return tensor.pin_memory().to(self._device, non_blocking=True)
        return tensor


def _layers_of(cache: DynamicCache) -> list[DynamicLayer]:
    layers = cast(list[DynamicLayer], cache.layers)
    for layer in layers:
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(
                f"batched decoding needs full-attention caches, got {type(layer).__name__}"
            )
    return layers


def _kv(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    assert layer.keys is not None and layer.values is not None, "a prefilled layer has both"
    return layer.keys, layer.values


class BatchDecoder:
    """Continuous batching of one model: `add` at any time, `step` advances every sequence.

    A step admits waiting sequences (prefilled together, up to `max_batch` rows and
    `max_prefill_tokens` padded prompt tokens per step), samples their first token, then
    feeds every row one token and samples the next. Sequences that finish leave the
    batch at once. Sampling is per sequence: greedy rows take the argmax of their own
    logits, sampled rows draw from their own generator.

    Args:
        model: A transformers causal LM in eval mode on `device`.
        tokenizer: Its tokenizer, for the text of each sequence.
        device: Torch device string the model lives on.
        eos_token_ids: Tokens that end a sequence.
        max_batch: Rows decoded together, >= 1.
        max_prefill_tokens: Padded prompt tokens prefilled in one step; a longer prompt
            is prefilled alone.
        tokenizer_lock: Held while the tokenizer decodes, when other threads encode
            with it (a Rust tokenizer must not be borrowed by two threads at once).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        device: str,
        eos_token_ids: frozenset[int],
        max_batch: int = 32,
        max_prefill_tokens: int = 4096,
        tokenizer_lock: AbstractContextManager[object] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        self._tokenizer = tokenizer
        self._device = device
        self._eos_token_ids = eos_token_ids
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self._tokenizer_lock = tokenizer_lock or nullcontext()
        self._batch = KVBatch(model, device, max_rows=max_batch)
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        # Taken from _waiting by this step; they join _running group by group.
        self._joining: list[_Sequence] = []
        self._finished: dict[DecodeRequest, GenerationOutput] = {}

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def add(self, request: DecodeRequest) -> None:
        """Queue a sequence; it joins the batch at the next step with room for it."""
        params = request.params
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self._device)
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed)
        assembler = TextAssembler(
            self._tokenizer,
            context_ids=request.prompt_ids[-_DETOKENIZE_CONTEXT:],
            stop=params.stop,
            on_token=request.on_token,
        )
        self._waiting.append(_Sequence(request, assembler, generator))

    def step(self) -> list[tuple[DecodeRequest, GenerationOutput]]:
        """Admit, prefill and decode once; returns the sequences that finished."""
        with torch.inference_mode():
            self._cancel()
            self._joining = self._admit()
            for group in _prefill_groups(self._joining):
                logits = self._batch.prefill([s.request.prompt_ids for s in group])
                self._running += group
                self._choose(group, logits)
            if self._joining:
                self._joining = []
                self._cancel()
            if self._running:
                logits = self._batch.decode([s.token_ids[-1] for s in self._running])
                self._choose(self._running, logits)
            return self._retire()

    def abort(self) -> list[DecodeRequest]:
        """Forget every sequence (after a failed step); returns their requests."""
        sequences = (*self._running, *self._joining, *self._waiting)
        requests = list(dict.fromkeys(s.request for s in sequences))  # a joiner may be running
        self._running.clear()
        self._joining.clear()
        self._waiting.clear()
        self._batch.keep([])
        return requests

    def _admit(self) -> list[_Sequence]:
        admitted: list[_Sequence] = []
        width = 0
        while self._waiting and len(self._running) + len(admitted) < self.max_batch:
            new_width = max(width, len(self._waiting[0].request.prompt_ids))
            if admitted and new_width * (len(admitted) + 1) > self.max_prefill_tokens:
                break
            admitted.append(self._waiting.popleft())
            width = new_width
        return admitted

    def _choose(self, sequences: list[_Sequence], logits: torch.Tensor) -> None:
        """Sample each unfinished sequence's next token from its row of logits."""
        for sequence in sequences:
            sequence.peak_batch = max(sequence.peak_batch, len(sequences))
        greedy: list[int] = []
        if any(s.request.params.temperature == 0 for s in sequences):
            greedy = logits.argmax(dim=-1).tolist()
        chosen: list[int | None] = []
        for row, sequence in enumerate(sequences):
            params = sequence.request.params
            if sequence.done:
                chosen.append(None)
            elif params.temperature == 0:
                chosen.append(greedy[row])
            else:
                token = sample_next_token(
                    logits[row : row + 1],
                    temperature=params.temperature,
                    top_p=params.top_p,
                    generator=sequence.generator,
                )
                chosen.append(int(token.item()))
        with self._tokenizer_lock:
            for sequence, token_id in zip(sequences, chosen, strict=True):
                if token_id is not None:
                    sequence.append(token_id, self._eos_token_ids)

    def _cancel(self) -> None:
        for sequence in [*self._running, *self._waiting]:
            cancel = sequence.request.should_cancel
            if not sequence.done and cancel is not None and cancel():
                sequence.finish_reason = "cancelled"
        for sequence in [s for s in self._waiting if s.done]:
            self._waiting.remove(sequence)
            self._finished[sequence.request] = sequence.output()
        # Rows that finished (or were cancelled) leave before the next forward pass.
        self._drop_done()

    def _drop_done(self) -> None:
        """Move finished rows out of the batch (KVBatch.keep is free when none are)."""
        kept = [row for row, s in enumerate(self._running) if not s.done]
        for sequence in self._running:
            if sequence.done:
                self._finished[sequence.request] = sequence.output()
        self._running = [self._running[row] for row in self._batch.keep(kept)]

    def _retire(self) -> list[tuple[DecodeRequest, GenerationOutput]]:
        self._drop_done()
        finished = list(self._finished.items())
        self._finished.clear()
        return finished


# Padded prompt tokens a prefill group may compute per real one. Prompts of mixed lengths
# prefilled together are padded to the longest; sorted by length and cut into groups, they
# waste at most this much, at the price of one more forward pass per group.
_PREFILL_PADDING = 1.2


def _prefill_groups(sequences: list[_Sequence]) -> list[list[_Sequence]]:
    """Split newcomers, shortest first, into groups whose padding stays small."""
    groups: list[list[_Sequence]] = []
    real = 0
    for sequence in sorted(sequences, key=lambda s: len(s.request.prompt_ids)):
        length = len(sequence.request.prompt_ids)  # the group's longest so far
        if groups and length * (len(groups[-1]) + 1) <= _PREFILL_PADDING * (real + length):
            groups[-1].append(sequence)
            real += length
        else:
            groups.append([sequence])
            real = length
    return groups
