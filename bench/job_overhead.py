"""What the service adds to one generation, side by side in one run.

Baseline: the same model generating the same prompts in-process (load once, call
CausalLM.generate). genserve: `genserve serve` on the embedded default (SQLite + the
SQLite broker) or on the servers named by GENSERVE_DATABASE_URL / GENSERVE_BROKER_URL,
each job submitted over HTTP and polled until stored (queue, claim, generate, embed
prompt and output, one transaction). Also times /v1/search once the history holds the
jobs. Prints medians over the repeats and the ratio genserve / baseline.

    .venv/bin/python bench/job_overhead.py --repeats 5 --max-tokens 64
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Write one sentence about the sea.",
    "Name three uses of copper.",
    "Explain what a compiler does in two sentences.",
    "Give a tip for sleeping better.",
    "Describe a sunrise in the mountains.",
    "What is photosynthesis?",
    "Suggest a name for a grey cat.",
    "Why is the sky blue?",
]


def baseline(model_name: str, cache: Path, prompts: list[str], max_tokens: int) -> list[float]:
    from models.backends import load_model, select_device
    from models.registry import get_spec

    device, dtype = select_device("cpu")
    model = load_model(get_spec(model_name), cache_dir=cache, device=device, dtype=dtype)
    model.generate(model.encode_chat([{"role": "user", "content": "warm up"}]), max_new_tokens=4)
    times = []
    for prompt in prompts:
        ids = model.encode_chat([{"role": "user", "content": prompt}])
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=max_tokens, temperature=0.0)
        times.append(time.perf_counter() - started)
    return times


def start_service(data_dir: Path, cache: Path, model: str, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "GENSERVE_DATA_DIR": str(data_dir),
        "GENSERVE_MODEL_CACHE_DIR": str(cache),
        "GENSERVE_CHAT_MODELS": model,
        "GENSERVE_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
    }
    log = open(data_dir / "serve.log", "wb")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def run_job(
    client: httpx.Client, model: str, prompt: str, max_tokens: int, poll_s: float = 0.1
) -> tuple[float, dict]:
    body = {
        "model": model,
        "input": {"prompt": prompt},
        "params": {"max_tokens": max_tokens, "temperature": 0},
    }
    started = time.perf_counter()
    job = client.post("/v1/jobs", json=body).json()
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(poll_s)
        job = client.get(f"/v1/jobs/{job['id']}").json()
    wall = time.perf_counter() - started
    if job["status"] != "succeeded":
        raise RuntimeError(f"job failed: {job}")
    return wall, client.get(f"/v1/generations/{job['generation_id']}").json()


def wait_ready(data_dir: Path, base_url: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    key_file = data_dir / "admin-key.txt"
    while time.monotonic() < deadline:
        try:
            if key_file.exists() and httpx.get(f"{base_url}/healthz").status_code == 200:
                return key_file.read_text().strip()
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("genserve did not start")


def measure_service(
    args: argparse.Namespace, prompts: list[str]
) -> tuple[list[float], list[float], list[float]]:
    data_dir = Path(tempfile.mkdtemp(prefix="genserve-bench-"))
    port = 8700 + os.getpid() % 200
    process = start_service(data_dir, args.cache, args.model, port)
    base_url = f"http://127.0.0.1:{port}"
    try:
        key = wait_ready(data_dir, base_url)
        with httpx.Client(
            base_url=base_url, timeout=300, headers={"Authorization": f"Bearer {key}"}
        ) as client:
            run_job(client, args.model, "warm up", 4)  # the worker has loaded its models
            walls, generate = [], []
            for prompt in prompts:
                wall, generation = run_job(client, args.model, prompt, args.max_tokens, args.poll_s)
                walls.append(wall)
                generate.append(generation["timings"]["generate_s"])
            searches = []
            for prompt in prompts:
                started = time.perf_counter()
                client.post("/v1/search", json={"query": prompt, "k": 5}).raise_for_status()
                searches.append(time.perf_counter() - started)
        return walls, generate, searches
    finally:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=1, help="passes over the 8 prompts")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--poll-s", type=float, default=0.1, help="client poll interval")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "models")
    args = parser.parse_args()
    prompts = PROMPTS * args.repeats

    base = baseline(args.model, args.cache, prompts, args.max_tokens)
    walls, generate, searches = measure_service(args, prompts)
    med = statistics.median
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}")
    broker = os.environ.get("GENSERVE_BROKER_URL") or "embedded"
    print(
        f"model {args.model}, {len(prompts)} jobs one at a time, greedy, "
        f"max_tokens {args.max_tokens}, broker {broker}"
    )
    print(f"{'measure':<44}{'median s':>10}")
    print(f"{'baseline: in-process generate':<44}{med(base):>10.3f}")
    print(f"{'genserve: worker generate_s':<44}{med(generate):>10.3f}")
    print(f"{'genserve: submit -> stored (HTTP wall)':<44}{med(walls):>10.3f}")
    print(f"{'genserve overhead per job (wall - baseline)':<44}{med(walls) - med(base):>10.3f}")
    print(f"{'ratio wall / baseline':<44}{med(walls) / med(base):>10.2f}")
    print(f"{'POST /v1/search (k=5, warm)':<44}{med(searches[1:]):>10.3f}")


if __name__ == "__main__":
    main()
