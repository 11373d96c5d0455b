"""Readiness, metrics and logs of the live API and worker, and Flower on the broker.

A job is followed through all of them: /readyz names the served models' workers, /metrics
shows the worker's tokens and the API's request, and the worker's log lines about the
job carry the id of the request that submitted it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.client import Client
from tests.e2e.conftest import SERVED, Live
from tests.utils.server import free_port

pytestmark = pytest.mark.e2e

MODEL = "tiny-random-llama"
T = TypeVar("T")


def _eventually(probe: Callable[[], T | None], timeout_s: float = 60) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        found = probe()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"{probe.__name__} did not hold within {timeout_s} s")
        time.sleep(0.5)


def _samples(base_url: str) -> list[tuple[str, dict[str, str], float]]:
    page = httpx.get(f"{base_url}/metrics", timeout=10).text
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    ]


def _value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum over the series of `name` whose labels include `labels` (every worker)."""
    return sum(
        value for found, have, value in samples if found == name and labels.items() <= have.items()
    )


def _json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


def test_a_job_is_seen_in_readiness_metrics_and_logs(live: Live) -> None:
    base = live.service.base_url
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}

    def ready() -> dict[str, Any] | None:
        answer = httpx.get(f"{base}/readyz", timeout=10)
        return answer.json() if answer.status_code == 200 else None

    checks = _eventually(ready)["checks"]
    assert checks["database"]["ok"] and checks["broker"]["ok"]
    assert set(checks["workers"]["models"]) == set(SERVED.split(","))
    assert all(count >= 1 for count in checks["workers"]["models"].values())

    before = _samples(base)
    finished = "genserve_jobs_finished_total"
    done_before = _value(before, finished, model=MODEL, status="succeeded")
    with httpx.Client(base_url=base, timeout=30) as http:
        answer = http.post(
            "/v1/jobs",
            json={"model": MODEL, "input": {"prompt": "observe me"}, "params": {"max_tokens": 6}},
            headers={"Authorization": f"Bearer {live.writer}"},
        )
    assert answer.status_code == 202
    request_id, job_id = answer.headers["x-request-id"], answer.json()["id"]
    with Client(base, live.writer) as client:
        assert client.wait(job_id, timeout_s=180).status == "succeeded"

    def counted() -> list[tuple[str, dict[str, str], float]] | None:
        samples = _samples(base)  # the worker's next beat brings its counters
        return samples if _value(samples, finished, model=MODEL) > done_before else None

    after = _eventually(counted, timeout_s=30)
    assert _value(after, finished, model=MODEL, status="succeeded", queue="interactive") >= 1
    assert _value(after, "genserve_generated_tokens_total", model=MODEL) >= 1
    assert _value(after, "genserve_time_to_first_token_seconds_count", model=MODEL) >= 1
    assert _value(after, "genserve_batch_size_count", model=MODEL) >= 1
    assert _value(after, "genserve_worker_up") >= 1
    assert _value(after, "genserve_model_workers", model=MODEL) >= 1
    assert _value(after, "genserve_database_up") == 1
    posted = "genserve_http_request_duration_seconds_count"
    assert _value(after, posted, method="POST", route="/v1/jobs", status="202") >= 1
    workers = {labels["worker"] for name, labels, _ in after if name == finished}
    assert workers and all(labels.get("worker") for name, labels, _ in after if name == finished)

    # The worker's lines about the job carry the request that submitted it.
    worker_lines = [
        line
        for line in _json_lines(live.service.log_dir / "worker.log")
        if line.get("job_id") == job_id
    ]
    assert worker_lines and all(line["request_id"] == request_id for line in worker_lines)
    assert any(f"job {job_id}: succeeded" in line["message"] for line in worker_lines)
    access = [
        line
        for line in _json_lines(live.service.log_dir / "api.log")
        if line.get("request_id") == request_id and line["logger"] == "genserve.access"
    ]
    assert [(line["route"], line["status"]) for line in access] == [("/v1/jobs", 202)]
    for name in ("api.log", "worker.log"):
        assert live.writer not in (live.service.log_dir / name).read_text(errors="replace")


def test_flower_sees_the_worker_and_its_tasks(live: Live, tmp_path: Path) -> None:
    if live.backend != "postgres":
        pytest.skip("task events need a broker with fanout (Redis); the embedded one has none")
    port = free_port()
    log = open(tmp_path / "flower.log", "wb")  # noqa: SIM115 - closed below
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.app:app", "flower"]
        + [f"--port={port}", "--address=127.0.0.1"],
        env={**live.service.env, "FLOWER_UNAUTHENTICATED_API": "true"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def worker_seen() -> list[str] | None:
            try:
                found = httpx.get(f"{base}/api/workers", params={"refresh": 1}, timeout=15)
            except httpx.HTTPError:
                return None
            names = list(found.json()) if found.status_code == 200 else []
            return names or None

        names = _eventually(worker_seen, timeout_s=60)
        assert any(name.startswith("genserve@") for name in names)
        with Client(live.service.base_url, live.writer) as client:
            job = client.submit(MODEL, prompt="flower", params={"max_tokens": 4})
            assert client.wait(job.id, timeout_s=180).status == "succeeded"

        def task_seen() -> dict[str, Any] | None:
            tasks = httpx.get(f"{base}/api/tasks", timeout=15).json()
            return next((t for t in tasks.values() if job.id in str(t.get("args"))), None)

        task = _eventually(task_seen, timeout_s=30)
        assert task["name"] == "genserve.run_job" and task["state"] == "SUCCESS"
    finally:
        flower.terminate()
        try:
            flower.wait(timeout=15)
        except subprocess.TimeoutExpired:
            flower.kill()
        log.close()
