"""Continuous batching (models/backends/decoding.py) against decoding each sequence alone."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from models.backends.causal_lm import CausalLM
from models.backends.decoding import (
    BatchDecoder,
    DecodeRequest,
    GenerationOutput,
    KVBatch,
    SamplingParams,
)

WORDS = "the sea a cat runs over green hills while old stars burn slowly in cold night".split()


def mixed_prompts(lm: CausalLM, count: int, seed: int = 0) -> list[list[int]]:
    """Chat prompts from 1 to 60 words: lengths differ by up to a few hundred tokens."""
    rng = random.Random(seed)
    return [
        lm.encode_chat(
            [{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 60)))}]
        )
        for _ in range(count)
    ]


def run_batched(
    decoder: BatchDecoder, requests: list[DecodeRequest], *, arrive_per_step: int
) -> dict[int, GenerationOutput]:
    """Feed `arrive_per_step` new requests before each step, as traffic would."""
    outputs: dict[int, GenerationOutput] = {}
    pending = list(requests)
    while pending or decoder.has_work:
        for request in pending[:arrive_per_step]:
            decoder.add(request)
        del pending[:arrive_per_step]
        outputs.update({id(request): output for request, output in decoder.step()})
    return outputs


def alone(lm: CausalLM, prompt: list[int], params: SamplingParams) -> GenerationOutput:
    return lm.generate(
        prompt,
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        seed=params.seed,
        stop=params.stop,
    )


def batched_and_alone(
    lm: CausalLM,
    decoder: BatchDecoder,
    prompts: list[list[int]],
    params: list[SamplingParams],
    *,
    arrive_per_step: int,
) -> list[tuple[GenerationOutput, GenerationOutput]]:
    """Each request's output through `decoder` (arriving as traffic would) and alone."""
    expected = [alone(lm, p, q) for p, q in zip(prompts, params, strict=True)]
    requests = [lm.request(p, q) for p, q in zip(prompts, params, strict=True)]
    outputs = run_batched(decoder, requests, arrive_per_step=arrive_per_step)
    return [(outputs[id(r)], want) for r, want in zip(requests, expected, strict=True)]


def test_greedy_batched_equals_alone_for_mixed_prompts_and_budgets(tiny_lm: CausalLM) -> None:
    prompts = mixed_prompts(tiny_lm, 40)
    params = [SamplingParams(max_new_tokens=1 + (i * 7) % 30, temperature=0) for i in range(40)]
    # A batch smaller than the traffic, so sequences also wait, join and leave.
    decoder = tiny_lm.decoder(max_batch=12, max_prefill_tokens=1024)
    pairs = batched_and_alone(tiny_lm, decoder, prompts, params, arrive_per_step=3)
    for got, want in pairs:
        assert got.token_ids == want.token_ids
        assert (got.text, got.finish_reason) == (want.text, want.finish_reason)
    assert max(got.peak_batch for got, _ in pairs) == 12
    assert not decoder.has_work


def test_rows_keep_their_own_cache_as_the_batch_reshapes(tiny_lm: CausalLM) -> None:
    """Rows leave from the middle (the last row takes their place), newcomers longer than
    every running row widen the batch on the left, and decoding outgrows the buffers'
    spare columns: every output is still the one decoded alone."""
    prompts = sorted(mixed_prompts(tiny_lm, 12, seed=6), key=len)[:10]
    prompts = [prompts[i] for i in (0, 2, 1, 9, 3, 8, 4, 7, 5, 6)]  # short and long mixed
    budgets = [3, 120, 9, 70, 2, 100, 15, 5, 80, 30]
    params = [SamplingParams(max_new_tokens=b, temperature=0) for b in budgets]
    decoder = tiny_lm.decoder(max_batch=4)
    pairs = batched_and_alone(tiny_lm, decoder, prompts, params, arrive_per_step=1)
    for got, want in pairs:
        assert got.token_ids == want.token_ids
    assert max(len(want.token_ids) for _, want in pairs) > 64  # past the spare columns


def test_a_leaving_row_copies_one_row_not_the_cache(tiny_lm: CausalLM) -> None:
    prompts = mixed_prompts(tiny_lm, 3, seed=7)
    decoder = tiny_lm.decoder(max_batch=3)
    budgets = (6, 3, 6)  # the middle row leaves in the second step (two tokens a step)
    requests = [
        tiny_lm.request(p, SamplingParams(max_new_tokens=b, temperature=0))
        for p, b in zip(prompts, budgets, strict=True)
    ]
    for request in requests:
        decoder.add(request)
    decoder.step()
    layers = decoder._batch._layers  # white box: the buffers themselves
    buffers = [id(layer.key_buffer) for layer in layers]
    finished = decoder.step()
    assert [id(r) for r, _ in finished] == [id(requests[1])]
    assert decoder.running == 2
    assert [id(layer.key_buffer) for layer in layers] == buffers
    rest = run_batched(decoder, [], arrive_per_step=1)
    for i in (0, 2):
        want = alone(tiny_lm, prompts[i], SamplingParams(max_new_tokens=6, temperature=0))
        assert rest[id(requests[i])].token_ids == want.token_ids


def test_newcomers_of_mixed_lengths_are_prefilled_in_groups(
    tiny_lm: CausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Padding every prompt to the longest wastes compute; sorted groups waste little."""
    shapes: list[tuple[int, int]] = []
    prefill = KVBatch.prefill

    def recorded(self: KVBatch, prompts: list[list[int]]) -> torch.Tensor:
        shapes.append((len(prompts), max(len(p) for p in prompts)))
        return prefill(self, prompts)

    monkeypatch.setattr(KVBatch, "prefill", recorded)
    short = [p for p in mixed_prompts(tiny_lm, 40, seed=8) if len(p) < 60]
    long = [p for p in mixed_prompts(tiny_lm, 40, seed=9) if len(p) > 200]
    prompts = short[:5] + long[:3]
    params = SamplingParams(max_new_tokens=3, temperature=0)
    decoder = tiny_lm.decoder(max_batch=8)
    requests = [tiny_lm.request(p, params) for p in prompts]
    outputs = run_batched(decoder, requests, arrive_per_step=8)
    assert len(shapes) >= 2
    assert sum(rows for rows, _ in shapes) == 8
    padded = sum(rows * width for rows, width in shapes)
    assert padded <= 1.2 * sum(map(len, prompts))
    for request, prompt in zip(requests, prompts, strict=True):
        assert outputs[id(request)].token_ids == alone(tiny_lm, prompt, params).token_ids


def test_per_request_sampling_and_stop_strings_hold_inside_a_batch(tiny_lm: CausalLM) -> None:
    prompts = mixed_prompts(tiny_lm, 16, seed=1)
    params = []
    for i, prompt in enumerate(prompts):
        if i % 4 == 0:  # a stop string this sequence really produces
            text = alone(tiny_lm, prompt, SamplingParams(max_new_tokens=20, temperature=0)).text
            params.append(SamplingParams(max_new_tokens=20, temperature=0, stop=(text[5:8],)))
        else:
            params.append(
                SamplingParams(max_new_tokens=8 + i, temperature=0.7 + i / 40, top_p=0.9, seed=i)
            )
    decoder = tiny_lm.decoder(max_batch=16)
    pairs = batched_and_alone(tiny_lm, decoder, prompts, params, arrive_per_step=5)
    for got, want in pairs:
        assert (got.token_ids, got.text) == (want.token_ids, want.text)
    stopped = [got for (got, _), q in zip(pairs, params, strict=True) if q.stop]
    assert stopped and all(o.finish_reason == "stop" for o in stopped)


def test_a_cancelled_sequence_leaves_and_the_others_go_on(tiny_lm: CausalLM) -> None:
    prompts = mixed_prompts(tiny_lm, 6, seed=2)
    params = SamplingParams(max_new_tokens=24, temperature=0)
    streamed: list[str] = []
    decoder = tiny_lm.decoder(max_batch=8)
    requests = [
        tiny_lm.request(
            p,
            params,
            # The third sequence is cancelled once it has streamed some text.
            should_cancel=(lambda: bool(streamed)) if i == 2 else None,
            on_token=streamed.append if i == 2 else None,
        )
        for i, p in enumerate(prompts)
    ]
    outputs = run_batched(decoder, requests, arrive_per_step=6)
    cancelled = outputs[id(requests[2])]
    assert cancelled.finish_reason == "cancelled"
    assert 1 <= cancelled.completion_tokens < 24
    for i, request in enumerate(requests):
        if i != 2:
            assert outputs[id(request)].token_ids == alone(tiny_lm, prompts[i], params).token_ids


def test_waiting_sequences_can_be_cancelled_before_they_start(tiny_lm: CausalLM) -> None:
    prompt = mixed_prompts(tiny_lm, 1)[0]
    decoder = tiny_lm.decoder(max_batch=1)
    first = tiny_lm.request(prompt, SamplingParams(max_new_tokens=5, temperature=0))
    second = tiny_lm.request(
        prompt, SamplingParams(max_new_tokens=5, temperature=0), should_cancel=lambda: True
    )
    outputs = run_batched(decoder, [first, second], arrive_per_step=2)
    assert outputs[id(second)].finish_reason == "cancelled"
    assert outputs[id(second)].completion_tokens == 0
    assert outputs[id(first)].completion_tokens == 5


def test_prefill_is_split_to_respect_max_prefill_tokens(tiny_lm: CausalLM) -> None:
    prompts = [p for p in mixed_prompts(tiny_lm, 40, seed=3) if len(p) > 100][:4]
    assert len(prompts) == 4
    limit = 2 * max(len(p) for p in prompts)
    decoder = tiny_lm.decoder(max_batch=8, max_prefill_tokens=limit)
    for prompt in prompts:
        decoder.add(tiny_lm.request(prompt, SamplingParams(max_new_tokens=50, temperature=0)))
    decoder.step()
    assert (decoder.running, decoder.waiting) == (2, 2)
    decoder.step()
    assert (decoder.running, decoder.waiting) == (4, 0)


def test_a_failed_step_gives_every_request_back(tiny_lm: CausalLM) -> None:
    def broken(_text: str) -> None:
        raise RuntimeError("the reader went away")

    prompts = mixed_prompts(tiny_lm, 3, seed=4)
    decoder = tiny_lm.decoder(max_batch=2)
    requests = [
        tiny_lm.request(p, SamplingParams(max_new_tokens=9, temperature=0), on_token=broken)
        for p in prompts
    ]
    for request in requests:
        decoder.add(request)
    with pytest.raises(RuntimeError, match="went away"):
        decoder.step()
    assert set(map(id, decoder.abort())) == set(map(id, requests))
    assert not decoder.has_work
    # The decoder is usable again.
    request = tiny_lm.request(prompts[0], SamplingParams(max_new_tokens=4, temperature=0))
    decoder.add(request)
    assert run_batched(decoder, [], arrive_per_step=1)[id(request)].completion_tokens == 4


def test_checks_happen_before_a_request_reaches_the_batch(tiny_lm: CausalLM) -> None:
    with pytest.raises(ValueError, match="must be <= 512"):
        tiny_lm.request([97] * 500, SamplingParams(max_new_tokens=20))
    with pytest.raises(ValueError, match="temperature"):
        tiny_lm.request([97], SamplingParams(max_new_tokens=2, temperature=3.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_batch_on_cuda_never_uses_cudnn_attention(tmp_path: Path) -> None:
    """cuDNN attention compiles a graph per shape, and a batch's shape changes every step."""
    from models.backends import load_model
    from models.registry import get_spec

    lm = load_model(
        get_spec("tiny-random-llama"), cache_dir=tmp_path, device="cuda", dtype=torch.bfloat16
    )
    assert isinstance(lm, CausalLM)
    decoder = lm.decoder(max_batch=4)
    requests = [
        lm.request(p, SamplingParams(max_new_tokens=6, temperature=0))
        for p in mixed_prompts(lm, 4, seed=5)
    ]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        outputs = run_batched(decoder, requests, arrive_per_step=2)
    ops = {event.key for event in prof.key_averages()}
    assert "aten::scaled_dot_product_attention" in ops
    assert not [op for op in ops if "cudnn_attention" in op]
    assert all(o.completion_tokens == 6 or o.finish_reason == "stop" for o in outputs.values())
