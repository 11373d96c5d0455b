"""Where a decoding step's time goes on a GPU, in-process (no server, no queue).

Per variant, one row: plain transformers generate on one sequence (ms per token), the
BatchDecoder on that sequence alone (ms per token), the BatchDecoder with 32 rows (ms
per step), and the same lone sequence through a fresh Engine thread (ms per token).
Variants: as shipped; with PyTorch free to pick cuDNN attention (as before the decoder
excluded it); with pageable instead of pinned host-to-device copies. Then the profile of
16 lone decoding steps and of transformers generate, by CPU time.

    python3 bench/gpu/probe.py
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from models.backends import decoding, load_model
from models.backends.causal_lm import CausalLM
from models.backends.decoding import GenerationOutput, SamplingParams
from models.registry import get_spec
from workers.engine.engine import Engine

TOKENS = 32
PROMPT = [{"role": "user", "content": "Is this claim true? Explain briefly: vitamin D helps."}]


def hf_ms(lm: CausalLM, ids: torch.Tensor, tokens: int = TOKENS) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        lm.model.generate(  # type: ignore[operator]
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
        )
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / tokens * 1000


def alone_ms(lm: CausalLM, prompt: list[int]) -> float:
    started = time.perf_counter()
    out = lm.generate(prompt, max_new_tokens=TOKENS, temperature=0)
    return (time.perf_counter() - started) / out.completion_tokens * 1000


def batch_ms(lm: CausalLM, prompt: list[int], rows: int = 32) -> float:
    decoder = lm.decoder(max_batch=rows)
    for _ in range(rows):
        decoder.add(lm.request(prompt, SamplingParams(max_new_tokens=TOKENS, temperature=0)))
    decoder.step()  # the prefill
    torch.cuda.synchronize()
    started, steps = time.perf_counter(), 0
    while decoder.has_work:
        decoder.step()
        steps += 1
    return (time.perf_counter() - started) / steps * 1000


def engine_ms(lm: CausalLM, prompt: list[int]) -> float:
    engine = Engine()
    started = time.perf_counter()
    handle = engine.generate(lm, prompt, SamplingParams(max_new_tokens=TOKENS, temperature=0))
    while not isinstance(out := handle.next(timeout=5), GenerationOutput):
        pass
    return (time.perf_counter() - started) / out.completion_tokens * 1000


@contextmanager
def patched(owner: object, name: str, value: object) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def any_attention(self: decoding.KVBatch, *args: object) -> None:
    original_init(self, *args)
    self._attention = nullcontext


original_init = decoding.KVBatch.__init__


def main() -> None:
    lm = load_model(
        get_spec("smollm2-135m-instruct"),
        cache_dir=Path(".cache/models"),
        device="cuda",
        dtype=torch.bfloat16,
    )
    assert isinstance(lm, CausalLM)
    prompt = lm.encode_chat(PROMPT)
    ids = torch.tensor([prompt], device="cuda")
    hf_ms(lm, ids), alone_ms(lm, prompt)  # warm-up
    variants: dict[str, Callable[[], object]] = {
        "as shipped": nullcontext,
        "cuDNN attention allowed": lambda: patched(decoding.KVBatch, "__init__", any_attention),
        "pageable copies": lambda: patched(
            decoding.KVBatch, "_to_device", lambda self, t: t.to(self._device)
        ),
    }
    for label, variant in variants.items():
        with variant():  # type: ignore[attr-defined]
            print(
                f"{label:<26} hf {hf_ms(lm, ids):6.2f} ms/tok | alone {alone_ms(lm, prompt):6.2f}"
                f" ms/tok | 32 rows {batch_ms(lm, prompt):6.2f} ms/step | engine "
                f"{engine_ms(lm, prompt):6.2f} ms/tok",
                flush=True,
            )
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=activities) as prof:
        lm.generate(prompt, max_new_tokens=16, temperature=0)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=20))
    with profile(activities=activities) as prof:
        hf_ms(lm, ids, 16)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
