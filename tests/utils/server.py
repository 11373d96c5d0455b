"""The real service in subprocesses: `genserve api` and `genserve worker`, talked to over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RemoteService:
    """Starts the API and one worker with the given environment; stops them on close."""

    def __init__(self, *, data_dir: Path, env: dict[str, str], log_dir: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "GENSERVE_DATA_DIR": str(data_dir),
            "GENSERVE_ENVIRONMENT": "test",
            **env,
        }
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def cli(self, *args: str) -> str:
        """Run `genserve ARGS` with the service's environment; returns stdout."""
        result = subprocess.run(
            [sys.executable, "-m", "service.cli", *args],
            env=self.env,
            capture_output=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"genserve {' '.join(args)} failed:\n{result.stderr.decode()}")
        return result.stdout.decode()

    def create_key(self, tenant: str, role: str = "writer") -> str:
        return self.cli("keys", "create", "--tenant", tenant, "--role", role).split()[-1]

    def start_process(self, name: str, *args: str) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start(self) -> RemoteService:
        self.cli("migrate")
        self.start_process("api", "api", "--port", str(self.port))
        self.start_process("worker", "worker")
        self.wait_healthy()
        return self

    def wait_healthy(
        self, timeout: float = 60, *, name: str = "api", base_url: str | None = None
    ) -> None:
        """Wait until the API process `name` answers /healthz at base_url (its own)."""
        base_url = base_url or self.base_url
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                raise RuntimeError(f"the API exited:\n{self.logs(name)}")
            try:
                if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the API did not become healthy:\n{self.logs(name)}")

    def logs(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")[-5000:]

    def stop_process(self, name: str, sig: int = signal.SIGTERM) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def close(self) -> None:
        for name in list(self.processes):
            self.stop_process(name)

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)


def wait_for_job(client: httpx.Client, job_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            return job
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} did not finish: {job}")
