"""Token streaming through the OpenAI API, side by side with in-process generation.

Baseline: the model in-process, timing the first token (CausalLM.generate's on_token)
and the whole generation. genserve: `genserve serve` on the embedded default (or the
servers in GENSERVE_DATABASE_URL / GENSERVE_BROKER_URL), driven by the official openai
client: a streamed chat completion's first content chunk and its end, and the same
request unstreamed. Prints medians and ratios to the baseline.

    .venv/bin/python -m bench.openai_stream --repeats 1 --max-tokens 64
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import tempfile
import time
from pathlib import Path

import openai

from bench.job_overhead import PROMPTS, ROOT, start_service, wait_ready


def _stamp_into(times: list[float]):  # noqa: ANN202 - an on_token callback
    return lambda _text: times.append(time.perf_counter())


def baseline(model_name: str, cache: Path, prompts: list[str], max_tokens: int) -> list[tuple]:
    from models.backends import load_model, select_device
    from models.registry import get_spec

    device, dtype = select_device("cpu")
    model = load_model(get_spec(model_name), cache_dir=cache, device=device, dtype=dtype)
    model.generate(model.encode_chat([{"role": "user", "content": "warm up"}]), max_new_tokens=4)
    rows = []
    for prompt in prompts:
        first: list[float] = []
        started = time.perf_counter()
        ids = model.encode_chat([{"role": "user", "content": prompt}])
        out = model.generate(
            ids, max_new_tokens=max_tokens, temperature=0.0, on_token=_stamp_into(first)
        )
        rows.append((first[0] - started, time.perf_counter() - started, out.completion_tokens))
    return rows


def streamed(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> tuple:
    started = time.perf_counter()
    first = None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    tokens = 0
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return first, time.perf_counter() - started, tokens


def unstreamed(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> float:
    started = time.perf_counter()
    client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
    )
    return time.perf_counter() - started


def measure_service(args: argparse.Namespace, prompts: list[str]) -> tuple[list, list]:
    data_dir = Path(tempfile.mkdtemp(prefix="genserve-bench-"))
    port = 8500 + os.getpid() % 200
    process = start_service(data_dir, args.cache, args.model, port)
    try:
        key = wait_ready(data_dir, f"http://127.0.0.1:{port}")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, timeout=300)
        unstreamed(client, args.model, "warm up", 4)  # the worker has loaded its models
        streams = [streamed(client, args.model, p, args.max_tokens) for p in prompts]
        plain = [unstreamed(client, args.model, p, args.max_tokens) for p in prompts]
        return streams, plain
    finally:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=1, help="passes over the 8 prompts")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "models")
    args = parser.parse_args()
    prompts = PROMPTS * args.repeats

    base = baseline(args.model, args.cache, prompts, args.max_tokens)
    streams, plain = measure_service(args, prompts)
    med = statistics.median
    base_first, base_total = med(r[0] for r in base), med(r[1] for r in base)
    first, total = med(s[0] for s in streams), med(s[1] for s in streams)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}")
    broker = os.environ.get("GENSERVE_BROKER_URL") or "embedded"
    print(
        f"model {args.model}, {len(prompts)} requests one at a time, greedy, "
        f"max_tokens {args.max_tokens}, broker {broker}; "
        f"median completion tokens {med(s[2] for s in streams):.0f}"
    )
    print(f"{'measure':<48}{'median s':>10}{'/ base':>8}")
    rows = [
        ("baseline: first token, in-process", base_first, base_first),
        ("baseline: whole generation, in-process", base_total, base_total),
        ("genserve: first streamed chunk (openai client)", first, base_first),
        ("genserve: streamed request, to [DONE]", total, base_total),
        ("genserve: unstreamed request", med(plain), base_total),
    ]
    for name, value, reference in rows:
        print(f"{name:<48}{value:>10.3f}{value / reference:>8.2f}")
    print(f"{'first chunk / whole streamed request':<48}{first / total:>10.2f}")


if __name__ == "__main__":
    main()
