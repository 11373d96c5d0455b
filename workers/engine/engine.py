"""The thread that owns a worker's device.

Job threads (Celery's thread pool) hand it generations and other device work; it runs
them on one thread so that nothing on the device is computed twice at once:

- generations go to the `BatchDecoder` of their model, which batches every sequence
  that is running (continuous batching, models/backends/decoding.py);
- other work (loading a model, embedding a stored generation, an embeddings request) is
  a call that runs between two decoding steps, so it neither waits for a whole generation
  nor competes with a step for the same cores.

On a CPU there is one more reason for one thread. PyTorch parallelises an operation with
OpenMP, and libgomp gives every thread that starts parallel work a pool of its own. Once
the pools together hold more threads than there are cores, libgomp stops spinning at its
barriers and sleeps instead, and every parallel region pays a wake-up: on 2 cores a small
elementwise operation went from 12 to 80-100 us, and a lone sequence from 45 to 63 ms a
token, when the model had been loaded on another thread than the one decoding. So the
models are loaded, and compute, on the engine thread only (workers/training.py gives
training a thread of its own, whose pool ends with it).

Text deltas and the final output travel back to the job thread through its
`GenerationHandle`; the engine thread never does I/O.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from models.backends.causal_lm import CausalLM
from models.backends.decoding import BatchDecoder, DecodeRequest, GenerationOutput, SamplingParams
from workers import telemetry

logger = logging.getLogger("genserve.worker")

T = TypeVar("T")


@dataclass(frozen=True)
class EngineLimits:
    """How much one model's batch may hold.

    Attributes:
        max_batch: Sequences decoded together.
        max_prefill_tokens: Padded prompt tokens prefilled in one step.
    """

    max_batch: int = 32
    max_prefill_tokens: int = 4096


class GenerationHandle:
    """A generation handed to the engine: its text deltas as they come, then its output."""

    def __init__(self) -> None:
        self._items: queue.SimpleQueue[str | GenerationOutput | BaseException] = queue.SimpleQueue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the engine to end the generation; it finishes with reason "cancelled"."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def next(self, timeout: float | None = None) -> str | GenerationOutput | None:
        """The next text delta, or the final output; None when `timeout` passes first.

        Raises:
            Exception: The error that failed the engine's step for this generation.
        """
        try:
            item = self._items.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def _put(self, item: str | GenerationOutput | BaseException) -> None:
        self._items.put(item)


class Engine:
    """One device, one thread: batched generation per model, and calls in between.

    Args:
        limits: Batch limits applied to every model.
        name: Name of the thread.
    """

    def __init__(self, limits: EngineLimits | None = None, *, name: str = "genserve-engine"):
        self.limits = limits or EngineLimits()
        self._name = name
        self._wake = threading.Condition()
        # Handed over under _wake by job threads, taken by the engine thread.
        self._inbox: list[tuple[CausalLM, DecodeRequest, GenerationHandle]] = []
        self._calls: list[tuple[Callable[[], object], Future[object]]] = []
        self._thread: threading.Thread | None = None
        # The engine thread's own.
        self._decoders: dict[CausalLM, BatchDecoder] = {}
        self._handles: dict[DecodeRequest, GenerationHandle] = {}

    def generate(
        self, model: CausalLM, prompt_ids: list[int], params: SamplingParams
    ) -> GenerationHandle:
        """Queue a generation; it joins its model's batch at the next step.

        Raises:
            ValueError: The prompt or params do not fit the model (checked here, in the
                caller's thread).
        """
        handle = GenerationHandle()
        request = model.request(
            prompt_ids,
            params,
            should_cancel=lambda: handle.cancelled,
            on_token=handle._put,
        )
        with self._wake:
            self._inbox.append((model, request, handle))
            self._start()
            self._wake.notify()
        return handle

    def call(self, function: Callable[[], T]) -> T:
        """Run `function` on the engine thread between two steps and return its result."""
        if threading.current_thread() is self._thread:
            return function()  # already there (a call that calls)
        future: Future[T] = Future()
        with self._wake:
            self._calls.append((function, future))  # type: ignore[arg-type]
            self._start()
            self._wake.notify()
        return future.result()

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (
                    self._inbox or self._calls or any(d.has_work for d in self._decoders.values())
                ):
                    self._wake.wait()
                inbox, self._inbox = self._inbox, []
                calls, self._calls = self._calls, []
            for model, request, handle in inbox:
                decoder = self._decoders.get(model)
                if decoder is None:
                    decoder = self._decoders[model] = model.decoder(
                        max_batch=self.limits.max_batch,
                        max_prefill_tokens=self.limits.max_prefill_tokens,
                    )
                decoder.add(request)
                self._handles[request] = handle
            for function, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(function())
                    except BaseException as exc:  # handed to the caller, who raises it
                        future.set_exception(exc)
            for model, decoder in self._decoders.items():
                if decoder.has_work:
                    self._step(decoder, model)

    def _step(self, decoder: BatchDecoder, model: CausalLM) -> None:
        try:
            finished = decoder.step()
        except Exception as exc:
            logger.exception("decoding step failed; failing its %d sequences", decoder.running)
            for request in decoder.abort():
                self._handles.pop(request)._put(exc)
            return
        for request, output in finished:
            self._handles.pop(request)._put(output)
        # The step's batch: what still runs, and what it finished.
        telemetry.engine_step(model.name, decoder.running + len(finished), decoder.running)
