"""Many processes writing to the embedded SQLite database at once, through the real API.

Seven `genserve api` processes and one `genserve worker` share one data directory (the
SQLite database, the embedded broker, the search index), and client threads send them
writes for a while: submissions, cancellations, deletions, key changes, metadata
updates, settings. Every answer is checked: none may be a 5xx or mention "database is
locked", and every job accepted must be in the database at the end, finished.

    .venv/bin/python -m tests.faults.sqlite_writers --seconds 60 [--json]

prints a summary and, last, one JSON line; tests/faults/test_sqlite_writers.py runs it
for a shorter while.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import text

from service.db.session import make_engine
from tests.utils.server import TERMINAL, RemoteService, free_port

MODEL = "tiny-random-llama"


@dataclass
class Soak:
    processes: int
    seconds: float
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    server_errors: int = 0
    locked: int = 0
    accepted: int = 0
    stored: int = 0
    unfinished: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.server_errors == 0
            and self.locked == 0
            and self.stored == self.accepted
            and self.unfinished == 0
        )


class Fleet(RemoteService):
    """The service with several API processes on one data directory."""

    def __init__(self, data_dir: Path, apis: int, cache_dir: Path | None) -> None:
        env = {
            "GENSERVE_CHAT_MODELS": MODEL,
            "GENSERVE_DEVICE": "cpu",
            "GENSERVE_BUILTIN_MODELS": "false",
        }
        if cache_dir is not None:
            env["GENSERVE_MODEL_CACHE_DIR"] = str(cache_dir)
        super().__init__(data_dir=data_dir, env=env, log_dir=data_dir)
        self.ports = [self.port, *(free_port() for _ in range(apis - 1))]

    def start(self) -> Fleet:
        self.cli("migrate")
        for index, port in enumerate(self.ports):
            self.start_process(f"api{index}", "api", "--port", str(port))
        self.start_process("worker", "worker", "--concurrency", "8")
        for index, port in enumerate(self.ports):
            self.wait_healthy(120, name=f"api{index}", base_url=f"http://127.0.0.1:{port}")
        return self


def _check(soak: Soak, lock: threading.Lock, response: httpx.Response, accepted: list[str]) -> None:
    status = response.status_code
    bad = status >= 500 or "locked" in response.text.lower()
    with lock:
        soak.requests += 1
        soak.statuses[str(status)] = soak.statuses.get(str(status), 0) + 1
        soak.server_errors += status >= 500
        soak.locked += "locked" in response.text.lower()
        if bad and len(soak.examples) < 5:
            request = response.request
            soak.examples.append(
                f"{request.method} {request.url.path}: {status} {response.text[:200]}"
            )
        if status == 202 and response.request.url.path == "/v1/jobs":
            accepted.append(response.json()["id"])


def _client_loop(
    base_url: str,
    admin: str,
    until: float,
    soak: Soak,
    lock: threading.Lock,
    accepted: list[str],
    seed: int,
) -> None:
    rng = random.Random(seed)
    mine: list[str] = []
    with httpx.Client(
        base_url=base_url, headers={"Authorization": f"Bearer {admin}"}, timeout=60
    ) as client:
        while time.monotonic() < until:
            action = rng.random()
            try:
                if action < 0.45 or not mine:
                    body = {
                        "model": MODEL,
                        "input": {"prompt": f"soak {rng.random()}"},
                        "params": {"max_tokens": 2},
                    }
                    response = client.post("/v1/jobs", json=body)
                    if response.status_code == 202:
                        mine.append(response.json()["id"])
                elif action < 0.55:
                    response = client.post(f"/v1/jobs/{rng.choice(mine)}/cancel")
                elif action < 0.65:
                    job = client.get(f"/v1/jobs/{rng.choice(mine)}").json()
                    target = job.get("generation_id")
                    response = (
                        client.delete(f"/v1/generations/{target}")
                        if target
                        else client.get("/v1/jobs")
                    )
                elif action < 0.75:
                    created = client.post("/v1/keys", json={"role": "reader"})
                    _check(soak, lock, created, accepted)
                    response = (
                        client.delete(f"/v1/keys/{created.json()['id']}")
                        if created.status_code == 201
                        else created
                    )
                elif action < 0.85:
                    response = client.patch("/v1/tenant", json={"redact_pii": rng.random() < 0.5})
                else:
                    response = client.get("/v1/generations", params={"limit": 20})
            except httpx.TransportError as exc:  # a client-side failure is a failure too
                with lock:
                    soak.server_errors += 1
                    soak.examples.append(f"transport error: {exc}")
                continue
            _check(soak, lock, response, accepted)


def soak(
    processes: int = 8, seconds: float = 60, threads: int = 16, cache_dir: Path | None = None
) -> Soak:
    """Run the soak; processes counts the API processes and the one worker."""
    result = Soak(processes=processes, seconds=seconds)
    with tempfile.TemporaryDirectory(prefix="sqlite-soak-") as directory:
        fleet = Fleet(Path(directory), apis=processes - 1, cache_dir=cache_dir)
        try:
            fleet.start()
            admin = fleet.create_key("soak", "admin")
            lock = threading.Lock()
            accepted: list[str] = []
            until = time.monotonic() + seconds
            workers = [
                threading.Thread(
                    target=_client_loop,
                    args=(f"http://127.0.0.1:{port}", admin, until, result, lock, accepted, index),
                )
                for index, port in zip(range(threads), itertools.cycle(fleet.ports), strict=False)
            ]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            # The backlog runs faster with the CPU to itself: one API is enough to drain it.
            for index in range(1, len(fleet.ports)):
                fleet.stop_process(f"api{index}")
            result.accepted = len(accepted)
            result.stored, result.unfinished = _settle(fleet, accepted)
        finally:
            fleet.close()
    return result


def _settle(fleet: Fleet, accepted: list[str], timeout: float = 900) -> tuple[int, int]:
    """(accepted jobs present in the database, of them not finished) once they settle.

    A job deleted with its generation is gone on purpose: those are counted as present.
    """
    engine = make_engine(f"sqlite:///{fleet.env['GENSERVE_DATA_DIR']}/genserve.sqlite")
    deleted = "SELECT count(*) FROM audit_events WHERE action = 'generation.delete'"
    deadline = time.monotonic() + timeout
    try:
        while True:
            with engine.connect() as connection:
                statuses = dict(connection.execute(text("SELECT id, status FROM jobs")).all())
                gone = connection.execute(text(deleted)).scalar_one()
            present = [statuses[job] for job in accepted if job in statuses]
            unfinished = sum(status not in TERMINAL for status in present)
            if unfinished == 0 or time.monotonic() > deadline:
                return len(present) + gone, unfinished
            time.sleep(1)
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    result = soak(args.processes, args.seconds, args.threads)
    if not args.json:
        print(
            f"{result.processes} processes, {result.seconds:.0f} s: {result.requests} requests "
            f"{dict(sorted(result.statuses.items()))}; 5xx {result.server_errors}, "
            f"'locked' {result.locked}; jobs accepted {result.accepted}, in the database "
            f"{result.stored}, unfinished {result.unfinished}"
        )
        for example in result.examples:
            print("  " + example)
    print(json.dumps({**asdict(result), "ok": result.ok}))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
