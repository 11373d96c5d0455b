"""Generation throughput side by side: plain transformers, genserve, `transformers serve`.

One run, one model (SmolLM2-135M-Instruct), the same greedy chat prompts (built from the
SciFact claims, mixed lengths) and --max-tokens for every system:

- baseline: transformers `model.generate(do_sample=False)` in a spawned child process, one
  prompt at a time, on the first --alone-prompts prompts; peak memory is the child's.
- genserve: `genserve serve` started fresh twice, "production" (a fresh PostgreSQL
  database and a flushed Redis db, both removed afterwards) and "embedded" (SQLite and
  the SQLite broker in a temp data dir), with its own default worker settings, driven
  with streamed `POST /v1/chat/completions`; peak memory is the VmHWM of the worker's
  process tree (every child of `serve` but the API).
- peer: `transformers serve FOLDER --device DEVICE` on the same converted folder, without
  and with `--continuous-batching`; its figure at each concurrency is the faster mode.
  Without batching it runs at concurrency 1 only unless --peer-plain-levels says more:
  it serves one request at a time, and at 8 it measured 0.95x its own concurrency-1 rate.

- with --ceiling, what batching can reach with no service around it, at the highest
  --concurrency C: transformers `generate` on static batches of C prompts (left padded;
  tokens counted up to each row's end, and with the steps padded after it), and
  genserve's engine in process, driven by C threads in a closed loop (no HTTP, broker or
  SQL). Each in its own spawned child.

--device cuda runs all three on the GPU in bfloat16 (SDPA attention), and reports the
GPU's name and the device memory each held; --backends embedded skips the production
configuration where PostgreSQL and Redis are not at hand (genserve's figure is then the
embedded one).

At each --concurrency level a client keeps that many streamed requests in flight until
the prompts are done (level 1 runs only the --alone-prompts prompts), after one warm-up
request. A phase issues no request after --phase-limit-s, waits for those in flight and
is marked partial. Per system and level: output tokens/s (completion tokens from the
usage chunk over the phase's wall time), latency p50/p99 (send to the end of the stream),
TTFT p50 (send to the first non-empty content) and peak memory; and the fraction of the
baseline's prompts whose genserve production output at the highest level is identical.
Prints tables, then with --json one JSON object as the last line. --service-env KEY=VALUE
(repeatable) passes settings to genserve; --logs DIR keeps the servers' logs.

    .venv/bin/python -m bench.generate --json
    .venv/bin/python -m bench.generate --prompts 64 --max-tokens 128 --json
    .venv/bin/python -m bench.generate --prompts 8 --max-tokens 16 --concurrency 1,4
    python -m bench.generate --device cuda --backends embedded --prompts 64 --max-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np

from bench.job_overhead import ROOT
from bench.scifact import data_dir

TEMPLATES = (
    "Is this claim true? Explain briefly: {a}",
    "{a} Discuss in a few sentences.",
    "Summarize in one line: {a}",
    "Here are two scientific claims. First: {a} Second: {b} "
    "Which one is better supported by evidence, and why? Answer step by step.",
)
# `transformers serve FOLDER` preloads the folder and pins every request to it; it runs on
# --device in the dtype genserve uses there (models.backends.select_device).
PEER_DTYPES = {"cpu": "float32", "cuda": "bfloat16"}
PEER_MODES = {"plain": [], "continuous_batching": ["--continuous-batching"]}
# Left out of what the servers inherit, so that "embedded" is embedded whatever the shell says.
SERVER_URLS = ("GENSERVE_DATABASE_URL", "GENSERVE_BROKER_URL", "GENSERVE_EVENTS_URL")
BACKENDS = ("production", "embedded")
CONVERSION_MARKER = "genserve_conversion.json"  # models.backends.smollm2.MARKER_FILENAME


@dataclass
class Reply:
    index: int
    latency_s: float
    ttft_s: float | None
    tokens: int | None  # completion tokens from the usage chunk; None when none came
    text: str


@dataclass
class Phase:
    concurrency: int
    planned: int  # prompts it was to run
    issued: int  # prompts sent before the phase limit
    wall_s: float
    replies: list[Reply]  # the requests that completed
    errors: list[str]  # the requests that failed (status, stream error, transport)

    def figures(self) -> dict[str, Any]:
        latencies = [r.latency_s for r in self.replies]
        ttfts = [r.ttft_s for r in self.replies if r.ttft_s is not None]
        tokens = sum(r.tokens or 0 for r in self.replies)
        return {
            "tok_s": round(tokens / self.wall_s, 2) if self.wall_s > 0 else 0.0,
            "p50_ms": _ms(latencies, 50),
            "p99_ms": _ms(latencies, 99),
            "ttft_p50_ms": _ms(ttfts, 50),
            "tokens": tokens,
            "completed": len(self.replies),
            "partial": self.issued < self.planned,
            "errors": len(self.errors),
            "first_error": self.errors[0][:300] if self.errors else None,
            "wall_s": round(self.wall_s, 2),
        }


@dataclass
class SystemRun:
    phases: dict[int, Phase] | None = None
    peak_mib: float | None = None  # VmHWM at the end of the run
    gpu_mib: float | None = None  # device memory held at the end of the run (cuda)
    startup_s: float | None = None  # start to ready (models loaded for the peer)
    error: str | None = None


def _ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def build_prompts(count: int) -> list[str]:
    """Deterministic prompts of mixed lengths from the SciFact claims, in file order."""
    with open(data_dir() / "queries.jsonl", encoding="utf-8") as handle:
        claims = [json.loads(line)["text"] for line in handle]
    return [
        TEMPLATES[i % len(TEMPLATES)].format(
            a=claims[2 * i % len(claims)], b=claims[(2 * i + 1) % len(claims)]
        )
        for i in range(count)
    ]


# --- (a) baseline: transformers generate, in a child process -------------------------------


def convert_model(model: str, cache: str) -> str:
    from models.backends.smollm2 import ensure_converted
    from models.registry import get_spec

    return str(ensure_converted(get_spec(model), cache_dir=Path(cache)))


def run_baseline(
    folder: str, prompts: list[str], max_tokens: int, device: str = "cpu"
) -> dict[str, Any]:
    """Runs in a spawned child: load once, warm up, generate each prompt greedily.

    On cuda the model runs in bfloat16 with SDPA attention, as genserve's worker runs it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BatchEncoding
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        """Stamps the first new token (generate puts the prompt first)."""

        def __init__(self) -> None:
            self.puts = 0
            self.at: float | None = None

        def put(self, value: torch.Tensor) -> None:
            self.puts += 1
            if self.puts == 2:
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()  # type: ignore[arg-type]  # transformers' wrapped .to

    def generate(prompt: str, budget: int, streamer: FirstToken | None = None) -> torch.Tensor:
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True
        )
        ids = cast(BatchEncoding, encoded)["input_ids"]
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        with torch.inference_mode():
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=budget,
                do_sample=False,
                streamer=streamer,
            )
        return out[0, input_ids.shape[1] :].cpu()  # on cuda: waits for the last token

    generate("Say hello.", 4)
    texts, tokens, ttfts, latencies = [], [], [], []
    started = time.perf_counter()
    for prompt in prompts:
        streamer, sent = FirstToken(), time.perf_counter()
        new = generate(prompt, max_tokens, streamer)
        latencies.append(time.perf_counter() - sent)
        ttfts.append((streamer.at or time.perf_counter()) - sent)
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
        tokens.append(int(new.shape[0]))
    wall = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    on_gpu = device.startswith("cuda")
    return {
        "gpu_mib": torch.cuda.max_memory_reserved() / 2**20 if on_gpu else None,
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "texts": texts,
        "tokens": tokens,
        "ttfts": ttfts,
        "latencies": latencies,
        "wall_s": wall,
        "peak_mib": peak_mib,
    }


def run_static_batches(
    folder: str, prompts: list[str], max_tokens: int, batch: int, device: str = "cpu"
) -> dict[str, Any]:
    """Runs in a spawned child: transformers generate on static batches, left padded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.padding_side = "left"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()  # type: ignore[arg-type]  # transformers' wrapped .to
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    useful = padded = 0
    started = time.perf_counter()
    for first in range(0, len(texts), batch):
        encoded = tokenizer(
            texts[first : first + batch],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        ).to(device)
        with torch.inference_mode():
            out = model.generate(
                **encoded,
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        new = out[:, encoded["input_ids"].shape[1] :].tolist()
        padded += len(new) * len(new[0])
        for row in new:
            useful += next((i + 1 for i, t in enumerate(row) if t in ends), len(row))
    wall = time.perf_counter() - started
    return {"tok_s": useful / wall, "padded_tok_s": padded / wall, "wall_s": wall}


def run_engine_alone(
    model_name: str, cache: str, prompts: list[str], max_tokens: int, clients: int, device: str
) -> dict[str, Any]:
    """Runs in a spawned child: genserve's engine, `clients` threads in a closed loop."""
    import queue
    import threading

    from models.backends.decoding import GenerationOutput, SamplingParams
    from workers.engine.engine import Engine, EngineLimits
    from workers.engine.runtime import ModelRuntime

    # The worker's runtime: its device, dtype and batch limits.
    runtime = ModelRuntime(cache_dir=Path(cache), device=device, limits=EngineLimits())
    model = runtime.chat_model(model_name)
    engine: Engine = runtime.engine
    pending: queue.SimpleQueue[list[int]] = queue.SimpleQueue()
    for prompt in prompts:
        pending.put(model.encode_chat([{"role": "user", "content": prompt}]))
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=0)
    made: list[int] = []

    def finish(handle: Any) -> int:
        while not isinstance(item := handle.next(), GenerationOutput):
            pass
        return int(item.completion_tokens)

    finish(engine.generate(model, model.encode_prompt("Say hello."), params))  # warm up

    def client() -> None:
        while True:
            try:
                ids = pending.get_nowait()
            except queue.Empty:
                return
            made.append(finish(engine.generate(model, ids, params)))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"tok_s": sum(made) / wall, "wall_s": wall}


def in_child(function: Callable[..., Any], *args: Any) -> Any:
    """Call function in a fresh spawned process (torch stays out of the bench process)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def ensure_folder(model: str, cache: Path) -> Path:
    from models.registry import get_spec

    folder = cache / model
    try:
        marker = json.loads((folder / CONVERSION_MARKER).read_text())
    except (OSError, ValueError):
        marker = {}
    if marker.get("version") != get_spec(model).version:
        print(f"converting {model} into {folder} ...", flush=True)
        folder = Path(in_child(convert_model, model, str(cache)))
    return folder


# --- servers: start, wait, stop, memory -----------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def served(
    command: list[str], env: dict[str, str], log: Path, stop: signal.Signals
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server in its own process group; stop the whole group on the way out."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    except BaseException:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        print(f"--- last lines of {log.name} ---", *tail, sep="\n", file=sys.stderr)
        raise
    finally:
        _stop_group(process, stop)


def _stop_group(process: subprocess.Popen[bytes], stop: signal.Signals) -> None:
    for sig, wait_s in ((stop, 60.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # stragglers of the group (a worker its parent could not stop)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_up(
    process: subprocess.Popen[bytes], url: str, ready: Path | None, timeout: float
) -> float:
    """Poll url until 200 (and ready exists), failing early if the process died; seconds."""
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        try:
            if (ready is None or ready.exists()) and httpx.get(url).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _subtree(pid: int, tree: dict[int, list[int]]) -> list[int]:
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        pending.extend(tree.get(current, []))
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def peak_mib(pids: list[int]) -> float | None:
    """Sum of VmHWM (peak resident memory) over pids."""
    total, seen = 0.0, False
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total, seen = total + int(line.split()[1]) / 1024, True
    return round(total, 1) if seen else None


def nvidia_smi(field: str) -> str | None:
    """The first GPU's value of one nvidia-smi query field, or None without a GPU."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.strip().splitlines()
    return lines[0].strip() if lines else None


def gpu_used_mib() -> float | None:
    """Device memory in use on the first GPU now, in MiB, or None without one."""
    used = nvidia_smi("memory.used")
    return float(used) if used is not None else None


def worker_peak_mib(serve_pid: int) -> float | None:
    """Peak memory of genserve's worker: every descendant of `serve` but the API's tree."""
    tree = _children()
    pids = []
    for child in tree.get(serve_pid, []):
        if "service.cli api" not in _cmdline(child):
            pids.extend(_subtree(child, tree))
    return peak_mib(pids)


# --- the streaming client --------------------------------------------------------------------


async def stream_chat(
    client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, index: int
) -> Reply:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent, first, parts, tokens = time.perf_counter(), None, [], None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
            for choice in chunk.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if first is None:
                        first = time.perf_counter() - sent
                    parts.append(content)
    return Reply(index, time.perf_counter() - sent, first, tokens, "".join(parts))


async def run_phase(
    base_url: str,
    headers: dict[str, str],
    model: str,
    prompts: list[str],
    *,
    count: int,
    concurrency: int,
    max_tokens: int,
    limit_s: float,
) -> Phase:
    """Keep `concurrency` requests in flight over prompts[:count]; none issued after limit_s."""
    pending = iter(range(count))
    issued: list[int] = []
    replies: list[Reply] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency)
    # A request queued behind a serial server may see no byte for minutes; ten is a hang.
    timeout = httpx.Timeout(30, read=600, pool=None)
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=timeout, limits=limits
    ) as client:
        started = time.perf_counter()
        deadline = started + limit_s

        async def lane() -> None:
            while time.perf_counter() < deadline and (index := next(pending, None)) is not None:
                issued.append(index)
                try:
                    replies.append(
                        await stream_chat(client, model, prompts[index], max_tokens, index)
                    )
                except (httpx.HTTPError, RuntimeError, ValueError) as exc:
                    errors.append(f"prompt {index}: {type(exc).__name__}: {exc}")

        await asyncio.gather(*(lane() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    replies.sort(key=lambda r: r.index)
    return Phase(concurrency, count, len(issued), wall, replies, errors)


def measure(
    base_url: str,
    headers: dict[str, str],
    model: str,
    prompts: list[str],
    args: argparse.Namespace,
    levels: list[int] | None = None,
) -> dict[int, Phase]:
    """One short warm-up request, then one phase per concurrency level."""
    warm_up = run_phase(
        base_url, headers, model, ["Say hello."], count=1, concurrency=1, max_tokens=4, limit_s=600
    )
    warmed = asyncio.run(warm_up)
    if warmed.errors:
        raise RuntimeError(f"warm-up request failed: {warmed.errors[0]}")
    phases: dict[int, Phase] = {}
    for concurrency in levels or args.concurrency:
        count = args.alone_prompts if concurrency == 1 else len(prompts)
        phases[concurrency] = asyncio.run(
            run_phase(
                base_url,
                headers,
                model,
                prompts,
                count=count,
                concurrency=concurrency,
                max_tokens=args.max_tokens,
                limit_s=args.phase_limit_s,
            )
        )
        print(f"  c={concurrency}: {_brief(phases[concurrency].figures())}", flush=True)
    return phases


def _brief(figures: dict[str, Any]) -> str:
    keys = ("tok_s", "p50_ms", "completed", "errors")
    return ", ".join(f"{key} {figures[key]}" for key in keys)


# --- (b) genserve ---------------------------------------------------------------------------


@contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    """A fresh database for one run, dropped afterwards; yields its SQLAlchemy URL."""
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    name = f"genserve_bench_{os.getpid()}"
    admin = make_url(admin_url).set(drivername="postgresql")
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(drop)
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield admin.set(drivername="postgresql+psycopg", database=name).render_as_string(
            hide_password=False
        )
    finally:
        with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
            conn.execute(drop)


@contextmanager
def flushed_redis(url: str) -> Iterator[str]:
    """The Redis db of url, flushed before and after."""
    import redis

    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


def measure_genserve(
    args: argparse.Namespace, prompts: list[str], work: Path, name: str, env: dict[str, str]
) -> SystemRun:
    data = work / name
    data.mkdir()
    port = free_port()
    env = {
        **{key: value for key, value in os.environ.items() if key not in SERVER_URLS},
        "GENSERVE_DATA_DIR": str(data),
        "GENSERVE_MODEL_CACHE_DIR": str(args.cache),
        "GENSERVE_CHAT_MODELS": args.model,
        "GENSERVE_DEVICE": args.device,
        "HF_HUB_OFFLINE": "1",
        **env,
        **args.service_env,
    }
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    print(f"genserve {name}: starting", flush=True)
    log = (args.logs or work) / f"genserve-{name}.log"
    idle_gpu = gpu_used_mib()
    with served(command, env, log, signal.SIGINT) as process:
        base_url = f"http://127.0.0.1:{port}"
        startup = wait_up(process, f"{base_url}/healthz", data / "admin-key.txt", timeout=300)
        print(f"  ready in {startup:.1f}s", flush=True)
        key = (data / "admin-key.txt").read_text().strip()
        phases = measure(base_url, {"Authorization": f"Bearer {key}"}, args.model, prompts, args)
        return SystemRun(
            phases,
            peak_mib=worker_peak_mib(process.pid),
            gpu_mib=gpu_held(idle_gpu),
            startup_s=round(startup, 1),
        )


def gpu_held(idle: float | None) -> float | None:
    """Device memory held now beyond what was in use before the server started."""
    now = gpu_used_mib()
    return round(now - idle, 1) if now is not None and idle is not None else None


# --- (c) the peer: transformers serve --------------------------------------------------------


def peer_levels(args: argparse.Namespace, mode: str) -> list[int]:
    """The concurrency levels the peer runs in `mode` (the unbatched one: a subset)."""
    if mode == "plain" and args.peer_plain_levels:
        return [c for c in args.concurrency if c in args.peer_plain_levels]
    return list(args.concurrency)


def measure_peer(
    args: argparse.Namespace, prompts: list[str], work: Path, folder: Path, mode: str
) -> SystemRun:
    cli = Path(sys.executable).with_name("transformers")
    port = free_port()
    command = [
        *(str(cli), "serve", str(folder), "--device", args.device),
        *("--dtype", PEER_DTYPES[args.device], "--host", "127.0.0.1", "--port", str(port)),
        *PEER_MODES[mode],
    ]
    idle_gpu = gpu_used_mib()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    print(f"peer {mode}: starting", flush=True)
    with served(command, env, (args.logs or work) / f"peer-{mode}.log", signal.SIGTERM) as process:
        base_url = f"http://127.0.0.1:{port}"
        startup = wait_up(process, f"{base_url}/health", None, timeout=300)
        print(f"  ready in {startup:.1f}s", flush=True)
        phases = measure(base_url, {}, str(folder), prompts, args, peer_levels(args, mode))
        return SystemRun(
            phases,
            peak_mib=peak_mib([process.pid]),
            gpu_mib=gpu_held(idle_gpu),
            startup_s=round(startup, 1),
        )


def count_peer_tokens(runs: dict[str, dict[int, Phase]], folder: Path) -> str:
    """Fill in completion tokens the peer did not report, by tokenizing its text."""
    missing = [
        r
        for phases in runs.values()
        for p in phases.values()
        for r in p.replies
        if r.tokens is None
    ]
    if not missing:
        return "usage"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    for reply in missing:
        reply.tokens = len(tokenizer(reply.text, add_special_tokens=False)["input_ids"])
    return f"tokenizer ({len(missing)} replies without usage)"


# --- report -------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "cpu": cpu,
        "gpu": nvidia_smi("name"),
    }


def first_difference(a: str, b: str) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def greedy_identical(
    baseline: dict[str, Any], phase: Phase | None
) -> tuple[float | None, int, list[str]]:
    if phase is None:
        return None, 0, []
    texts = {r.index: r.text for r in phase.replies}
    compared = [i for i in range(len(baseline["texts"])) if i in texts]
    notes = []
    for i in compared:
        want, got = baseline["texts"][i], texts[i]
        if want != got:
            at = first_difference(want, got)
            notes.append(
                f"  prompt {i}: differs at char {at}: baseline {want[at : at + 40]!r} "
                f"vs genserve {got[at : at + 40]!r}"
            )
    same = len(compared) - len(notes)
    return (round(same / len(compared), 4) if compared else None), len(compared), notes


ROW = "{:<26}{:>5}{:>6}{:>9}{:>10}{:>10}{:>10}{:>10}{:>7}{:>7}"


def print_table(result: dict[str, Any], levels: list[int], notes: list[str]) -> None:
    m, memory = result["machine"], result["peak_memory_mib"]
    print(f"\nmachine: {m['arch']}, {m['cores']} cores, {m['platform']}, CPU {m['cpu']}")
    print(f"device: {result['device']}, GPU memory held (MiB): {result['gpu_memory_mib']}")
    print(
        f"model {result['model']}, {result['prompts']} prompts ({result['alone_prompts']} at "
        f"concurrency 1 and for the baseline), greedy, max_tokens {result['max_tokens']}, "
        f"phase limit {result['phase_limit_s']:.0f}s"
    )
    print(ROW.format("system", "conc", "done", "tok/s", "p50 ms", "p99 ms", "TTFT p50",
                     "peak MiB", "/base", "/peer"))  # fmt: skip
    print(ROW.format("baseline (transformers)", 1, f"{result['alone_prompts']} ",
                     f"{result['baseline_tok_s']:.1f}", _fmt(result["baseline_p50_ms"]),
                     _fmt(result["baseline_p99_ms"]), _fmt(result["baseline_ttft_ms"]),
                     _fmt(memory["baseline"]), "", ""))  # fmt: skip
    systems = [
        ("genserve production", "genserve_production", result["genserve_error"]),
        ("genserve embedded", "genserve_embedded", result["genserve_embedded_error"]),
    ]
    for mode in PEER_MODES:
        systems.append((f"peer {mode}", f"peer_{mode}", result["peer_mode_errors"].get(mode)))
    for name, key, error in systems:
        if error:
            print(f"{name:<26}{'' if error.startswith('not run') else 'failed: '}{error[:200]}")
        rows = result["peer_modes"][key[5:]] if key.startswith("peer_") else result[key]
        for n, level in enumerate(levels):
            if rows and str(level) in rows:
                peak = memory[key.removesuffix("_production")] if n == 0 else None
                _print_row(name, level, rows[str(level)], peak, result, peer=key.startswith("peer"))
    print("(* partial: the phase limit stopped new requests; figures over those completed)")
    print_notes(result, levels, notes)


def _print_row(
    name: str, level: int, row: dict[str, Any], peak: float | None, result: dict, *, peer: bool
) -> None:
    best = (result["peer"] or {}).get(str(level), {})
    print(ROW.format(name, level, f"{row['completed']}{'*' if row['partial'] else ' '}",
                     f"{row['tok_s']:.1f}", _fmt(row["p50_ms"]), _fmt(row["p99_ms"]),
                     _fmt(row["ttft_p50_ms"]), _fmt(peak),
                     _ratio(row["tok_s"], result["baseline_tok_s"]),
                     "" if peer else _ratio(row["tok_s"], best.get("tok_s"))))  # fmt: skip


def print_notes(result: dict[str, Any], levels: list[int], notes: list[str]) -> None:
    for key in ("genserve", "genserve_embedded", "peer"):
        for level, row in (result[key] or {}).items():
            if row["errors"]:
                print(f"{key} c={level}: {row['errors']} requests failed: {row['first_error']}")
    if result["peer"]:
        modes = ", ".join(f"c={c} {row['mode']}" for c, row in result["peer"].items())
        print(f"peer figure (/peer) = its faster mode: {modes}")
    else:
        print(f"peer: {result['peer_error']}")
    print(f"peer completion tokens counted by {result['peer_tokens_counted_by']}")
    print(
        f"greedy-identical (genserve {result['genserve_backend']} c={max(levels)} vs baseline): "
        f"{result['greedy_identical_fraction']} over {result['greedy_compared']} prompts"
    )
    for note in notes:
        print(note)


def _fmt(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"


def _ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}" if value and reference else "-"


def levels_of(phases: dict[int, Phase] | None) -> dict[str, dict[str, Any]] | None:
    return {str(c): p.figures() for c, p in phases.items()} if phases is not None else None


def best_peer(modes: dict[str, dict[int, Phase]]) -> dict[str, dict[str, Any]] | None:
    best: dict[str, dict[str, Any]] = {}
    for mode, phases in modes.items():
        for concurrency, phase in phases.items():
            row = {**phase.figures(), "mode": mode}
            if row["tok_s"] > best.get(str(concurrency), {"tok_s": -1.0})["tok_s"]:
                best[str(concurrency)] = row
    return best or None


# --- main -----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=sorted(PEER_DTYPES),
        help="where every system runs the model (cuda: bfloat16, as genserve's worker does)",
    )
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="genserve's configurations to run: production (PostgreSQL + Redis), embedded",
    )
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    parser.add_argument("--alone-prompts", type=int, help="at concurrency 1 and for the baseline")
    parser.add_argument("--phase-limit-s", type=float, default=40.0)
    parser.add_argument(
        "--peer-plain-levels",
        default="1",
        help="levels the unbatched peer runs (empty: all); it serves one request at a time, "
        "so at higher concurrency it only repeats its concurrency-1 rate, slowly, and the "
        "peer's batched mode is the faster there",
    )
    parser.add_argument(
        "--peer-modes",
        default=",".join(PEER_MODES),
        help=f"the peer's modes to run, a subset of {', '.join(PEER_MODES)}",
    )
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="also static batches in transformers and genserve's engine alone, in process",
    )
    parser.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/7", help="flushed")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "models")
    parser.add_argument("--logs", type=Path, help="keep the servers' logs in this folder")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    args.peer_plain_levels = {int(c) for c in args.peer_plain_levels.split(",") if c.strip()}
    args.peer_modes = [m.strip() for m in args.peer_modes.split(",") if m.strip()]
    if not set(args.peer_modes) <= set(PEER_MODES):
        parser.error(f"--peer-modes takes a comma-separated subset of {', '.join(PEER_MODES)}")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.backends or not set(args.backends) <= set(BACKENDS):
        parser.error(f"--backends takes a comma-separated subset of {', '.join(BACKENDS)}")
    if args.prompts < 1 or not args.concurrency or args.concurrency[0] < 1:
        parser.error("--prompts and every --concurrency level must be >= 1")
    if args.alone_prompts is None:
        args.alone_prompts = min(8, args.prompts)
    args.alone_prompts = max(1, min(args.alone_prompts, args.prompts))
    if any("=" not in item for item in args.service_env):
        parser.error("--service-env takes KEY=VALUE")
    args.service_env = dict(item.split("=", 1) for item in args.service_env)
    args.cache = args.cache.resolve()
    if args.logs is not None:
        args.logs = args.logs.resolve()
        args.logs.mkdir(parents=True, exist_ok=True)
    return args


def attempt(label: str, run: Callable[[], SystemRun]) -> SystemRun:
    """Run one system; a server that will not start or serve is reported, not fatal."""
    started = time.perf_counter()
    try:
        return run()
    except (RuntimeError, TimeoutError, OSError, ValueError, httpx.HTTPError) as exc:
        error = f"{type(exc).__name__}: {exc}"
        print(f"  {label} failed: {error}", flush=True)
        return SystemRun(error=error)
    finally:
        print(f"  {label}: {time.perf_counter() - started:.0f}s in all", flush=True)


def run_servers(args: argparse.Namespace, prompts: list[str], folder: Path) -> dict[str, SystemRun]:
    runs = {}
    with tempfile.TemporaryDirectory(prefix="genserve-bench-generate-") as tmp:
        work = Path(tmp)
        runs["genserve"] = runs["genserve_embedded"] = SystemRun(error="not run (--backends)")
        if "production" in args.backends:
            with postgres_database(args.postgres_url) as db_url, flushed_redis(args.redis_url):
                env = {"GENSERVE_DATABASE_URL": db_url, "GENSERVE_BROKER_URL": args.redis_url}
                runs["genserve"] = attempt(
                    "genserve production",
                    partial(measure_genserve, args, prompts, work, "production", env),
                )
        if "embedded" in args.backends:
            runs["genserve_embedded"] = attempt(
                "genserve embedded", partial(measure_genserve, args, prompts, work, "embedded", {})
            )
        for mode in PEER_MODES:
            if mode not in args.peer_modes:
                runs[f"peer_{mode}"] = SystemRun(error="not run (--peer-modes)")
                continue
            if not peer_levels(args, mode):  # none of its levels is asked for: no server
                runs[f"peer_{mode}"] = SystemRun(error="not run (--peer-plain-levels)")
                continue
            runs[f"peer_{mode}"] = attempt(
                f"peer {mode}", partial(measure_peer, args, prompts, work, folder, mode)
            )
    return runs


def build_result(
    args: argparse.Namespace, base: dict[str, Any], runs: dict[str, SystemRun], folder: Path
) -> tuple[dict[str, Any], list[str]]:
    peer_runs = {m: r.phases for m in PEER_MODES if (r := runs[f"peer_{m}"]).phases is not None}
    counted_by = count_peer_tokens(peer_runs, folder)
    peer = best_peer(peer_runs)
    errors = {m: runs[f"peer_{m}"].error for m in PEER_MODES if runs[f"peer_{m}"].error}
    peer_error = None if peer else "; ".join(f"{m}: {e}" for m, e in errors.items()) or "no data"
    # The production configuration is genserve's figure; without it (--backends), embedded.
    backend = "production" if runs["genserve"].phases is not None else "embedded"
    genserve = runs["genserve" if backend == "production" else "genserve_embedded"]
    fraction, compared, notes = greedy_identical(
        base, (genserve.phases or {}).get(max(args.concurrency))
    )
    peer_mib = [mib for m in PEER_MODES if (mib := runs[f"peer_{m}"].peak_mib) is not None]
    result: dict[str, Any] = {
        "model": args.model,
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "baseline_tok_s": round(sum(base["tokens"]) / base["wall_s"], 2),
        "genserve": levels_of(genserve.phases),
        "genserve_backend": backend,
        "device": base["device"],
        "peer": peer,
        "peer_error": peer_error,
        "greedy_identical_fraction": fraction,
        "greedy_compared": compared,
        "genserve_production": levels_of(runs["genserve"].phases),
        "genserve_embedded": levels_of(runs["genserve_embedded"].phases),
        "genserve_error": runs["genserve"].error,
        "genserve_embedded_error": runs["genserve_embedded"].error,
        "peer_modes": {m: levels_of(runs[f"peer_{m}"].phases) for m in PEER_MODES},
        "peer_mode_errors": errors,
        "peer_tokens_counted_by": counted_by,
        "peak_memory_mib": {
            "baseline": round(base["peak_mib"], 1),
            "genserve": runs["genserve"].peak_mib,
            "genserve_embedded": runs["genserve_embedded"].peak_mib,
            "peer": max(peer_mib, default=None),
            **{f"peer_{m}": runs[f"peer_{m}"].peak_mib for m in PEER_MODES},
        },
        "gpu_memory_mib": {
            "baseline": round(base["gpu_mib"], 1) if base["gpu_mib"] is not None else None,
            **{name: run.gpu_mib for name, run in runs.items()},
        },
        "startup_s": {name: run.startup_s for name, run in runs.items()},
        "baseline_ttft_ms": _ms(base["ttfts"], 50),
        "baseline_p50_ms": _ms(base["latencies"], 50),
        "baseline_p99_ms": _ms(base["latencies"], 99),
        "baseline_tokens": sum(base["tokens"]),
        "alone_prompts": args.alone_prompts,
        "concurrency": args.concurrency,
        "phase_limit_s": args.phase_limit_s,
        "service_env": args.service_env,
        "machine": machine(),
    }
    return result, notes


def measure_ceiling(args: argparse.Namespace, prompts: list[str], folder: Path) -> dict[str, Any]:
    """What batching reaches at the highest level without the service around it."""
    batch = max(args.concurrency)
    print(f"ceiling: static batches of {batch} in transformers, and the engine alone", flush=True)
    static = in_child(run_static_batches, str(folder), prompts, args.max_tokens, batch, args.device)
    engine = in_child(
        run_engine_alone,
        args.model,
        str(args.cache),
        prompts,
        args.max_tokens,
        batch,
        args.device,
    )
    print(
        f"  static {static['tok_s']:.1f} tok/s ({static['padded_tok_s']:.1f} with padding), "
        f"engine alone {engine['tok_s']:.1f} tok/s",
        flush=True,
    )
    return {
        "batch": batch,
        "static_batch_tok_s": round(static["tok_s"], 2),
        "static_batch_padded_tok_s": round(static["padded_tok_s"], 2),
        "engine_alone_tok_s": round(engine["tok_s"], 2),
    }


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanups
    started = time.perf_counter()
    prompts = build_prompts(args.prompts)
    folder = ensure_folder(args.model, args.cache)
    print(f"baseline: transformers generate on {args.alone_prompts} prompts", flush=True)
    base = in_child(
        run_baseline, str(folder), prompts[: args.alone_prompts], args.max_tokens, args.device
    )
    print(f"  {sum(base['tokens']) / base['wall_s']:.1f} tok/s", flush=True)
    ceiling = measure_ceiling(args, prompts, folder) if args.ceiling else None
    runs = run_servers(args, prompts, folder)
    result, notes = build_result(args, base, runs, folder)
    result["ceiling"] = ceiling
    print_table(result, args.concurrency, notes)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(f"total run time: {result['seconds']:.0f} s")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
