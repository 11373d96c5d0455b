"""The engine thread: generations from many job threads share one batch per model."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from models.backends.causal_lm import CausalLM
from models.backends.decoding import GenerationOutput, SamplingParams
from tests.models.test_decoding import mixed_prompts
from workers.engine.engine import Engine, EngineLimits, GenerationHandle


def follow(handle: GenerationHandle) -> tuple[str, GenerationOutput]:
    """What a job thread does: collect the deltas until the output arrives."""
    deltas = []
    while True:
        item = handle.next(timeout=30)
        assert item is not None, "the engine went quiet"
        if isinstance(item, str):
            deltas.append(item)
        else:
            return "".join(deltas), item


def long_running_prompt(lm: CausalLM, tokens: int) -> list[int]:
    """A prompt the random model continues greedily for `tokens` tokens without EOS."""
    for prompt in mixed_prompts(lm, 40, seed=6):
        if len(prompt) + tokens <= lm.context_length:
            if lm.generate(prompt, max_new_tokens=tokens, temperature=0).finish_reason == "length":
                return prompt
    raise AssertionError(f"no prompt runs {tokens} tokens")


def test_job_threads_share_the_batch_and_get_what_alone_gives(tiny_lm: CausalLM) -> None:
    engine = Engine(EngineLimits(max_batch=8))
    prompts = mixed_prompts(tiny_lm, 24, seed=5)
    params = [SamplingParams(max_new_tokens=10 + i % 13, temperature=0) for i in range(24)]
    start = threading.Barrier(24)

    def job(index: int) -> tuple[str, GenerationOutput]:
        start.wait()
        return follow(engine.generate(tiny_lm, prompts[index], params[index]))

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(job, range(24)))
    for (streamed, output), prompt, param in zip(results, prompts, params, strict=True):
        want = tiny_lm.generate(prompt, max_new_tokens=param.max_new_tokens, temperature=0)
        assert output.token_ids == want.token_ids
        assert streamed == output.text == want.text
    assert max(output.peak_batch for _, output in results) == 8


def test_a_cancelled_handle_ends_its_generation(tiny_lm: CausalLM) -> None:
    engine = Engine()
    prompt = long_running_prompt(tiny_lm, 400)
    handle = engine.generate(tiny_lm, prompt, SamplingParams(max_new_tokens=400, temperature=0))
    assert isinstance(handle.next(timeout=30), str)  # it is running
    handle.cancel()
    _, output = follow(handle)
    assert output.finish_reason == "cancelled" and output.completion_tokens < 400


def test_calls_run_on_the_engine_thread_and_raise_in_the_caller(tiny_lm: CausalLM) -> None:
    engine = Engine()
    prompt = tiny_lm.encode_chat([{"role": "user", "content": "Go on."}])
    handle = engine.generate(tiny_lm, prompt, SamplingParams(max_new_tokens=60, temperature=0))
    assert engine.call(lambda: threading.current_thread().name) == "genserve-engine"

    def fails() -> None:
        raise KeyError("no such thing")

    with pytest.raises(KeyError, match="no such thing"):
        engine.call(fails)
    _, output = follow(handle)
    assert output.completion_tokens == 60 or output.finish_reason == "stop"


def test_a_request_that_does_not_fit_is_refused_in_the_callers_thread(
    tiny_lm: CausalLM,
) -> None:
    with pytest.raises(ValueError, match="must be <= 512"):
        Engine().generate(tiny_lm, [97] * 500, SamplingParams(max_new_tokens=20))
