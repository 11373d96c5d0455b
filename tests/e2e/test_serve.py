"""`genserve serve` (what `make run` runs): first start prints a key; Ctrl-C stops all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.utils.server import free_port, wait_for_job

pytestmark = pytest.mark.e2e


def _read_key(process: subprocess.Popen[str], timeout: float = 120) -> str:
    """The line after 'admin API key' in serve's output."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        if line.startswith("admin API key"):
            return process.stdout.readline().strip()
        if not line and process.poll() is not None:
            break
    raise AssertionError("no admin key printed:\n" + "".join(lines))


def test_serve_first_start_and_ctrl_c(tmp_path: Path, model_cache_dir: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "GENSERVE_DATA_DIR": str(tmp_path),
        "GENSERVE_CHAT_MODELS": "tiny-random-llama",
        "GENSERVE_MODEL_CACHE_DIR": str(model_cache_dir),
        "GENSERVE_DEVICE": "cpu",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        key = _read_key(process)
        assert (tmp_path / "admin-key.txt").read_text().strip() == key
        assert (tmp_path / "admin-key.txt").stat().st_mode & 0o077 == 0
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            timeout=30,
            headers={"Authorization": f"Bearer {key}"},
        ) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    client.get("/healthz").raise_for_status()
                    break
                except httpx.HTTPError:
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
            job = client.post(
                "/v1/jobs", json={"model": "tiny-random-llama", "input": {"prompt": "hi"}}
            ).json()
            assert wait_for_job(client, job["id"])["status"] == "succeeded"
        children = psutil.Process(process.pid).children(recursive=True)
        assert len(children) >= 2
        # Ctrl-C at a terminal signals the whole foreground process group.
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=60) == 0
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert alive == []
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
