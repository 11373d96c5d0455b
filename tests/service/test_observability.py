"""Logs with ids, worker heartbeats, the metrics page and readiness, in process.

The end-to-end side (a real worker's metrics and logs through the API) is in
tests/e2e/test_observability.py.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session

from service import logs, metrics
from service.api.app import create_app
from service.config import Settings
from service.db import crud, workers
from service.db.session import make_engine, make_sessionmaker
from service.db.tables import WorkerHeartbeat, utcnow
from tests.utils.factories import make_job, make_key
from workers import telemetry


def _record(message: str = "hello", **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("genserve.test", logging.INFO, __file__, 1, message, (), None)
    for name, value in extra.items():
        setattr(record, name, value)
    logs.ContextIds().filter(record)
    return record


def test_json_lines_carry_the_ids_of_their_context_and_the_extras() -> None:
    with logs.ids(request_id="req1", job_id="job_1"):
        inside = json.loads(logs.JsonFormatter().format(_record("ran", status=200)))
    outside = json.loads(logs.JsonFormatter().format(_record("idle")))
    assert inside["message"] == "ran" and inside["level"] == "INFO"
    assert inside["request_id"] == "req1" and inside["job_id"] == "job_1"
    assert inside["status"] == 200 and inside["logger"] == "genserve.test"
    assert "request_id" not in outside and "job_id" not in outside
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed")
        record.exc_info = sys.exc_info()
    assert "ValueError: boom" in json.loads(logs.JsonFormatter().format(record))["exception"]


def test_text_lines_end_with_the_ids_that_are_set() -> None:
    with logs.ids(job_id="job_2"):
        line = logs.TextFormatter().format(_record("ran"))
    assert line.endswith("genserve.test ran job_id=job_2")
    assert logs.TextFormatter().format(_record("idle")).endswith("genserve.test idle")


def test_a_workers_families_are_republished_with_its_label() -> None:
    registry = CollectorRegistry(auto_describe=False)
    tokens = Counter("t_tokens", "Tokens.", ["model"], registry=registry)
    latency = Histogram(
        "t_latency_seconds", "Latency.", ["model"], buckets=(1, 5), registry=registry
    )
    tokens.labels("m").inc(7)
    latency.labels("m").observe(2)
    # What the heartbeat stores goes through JSON.
    stored = json.loads(json.dumps(telemetry.snapshot(registry)))
    into: dict[str, metrics.Metric] = {}
    metrics._republish(into, "w1", stored)
    metrics._republish(into, "w2", stored)
    page = CollectorRegistry(auto_describe=False)

    class Fixed:
        def collect(self):  # noqa: ANN202
            return list(into.values())

    page.register(Fixed())  # type: ignore[arg-type]
    parsed = {f.name: f for f in text_string_to_metric_families(metrics.render(page).decode())}
    samples = {
        (s.name, s.labels.get("worker"), s.labels.get("le")): s.value
        for f in parsed.values()
        for s in f.samples
    }
    assert parsed["t_tokens"].type == "counter" and parsed["t_latency_seconds"].type == "histogram"
    for worker in ("w1", "w2"):
        assert samples[("t_tokens_total", worker, None)] == 7
        assert samples[("t_latency_seconds_bucket", worker, "1.0")] == 0
        assert samples[("t_latency_seconds_bucket", worker, "5.0")] == 1
        assert samples[("t_latency_seconds_count", worker, None)] == 1
    assert not any(name.endswith("_created") for name, _, _ in samples)


def _beat(session: Session, worker_id: str, models: list[str]) -> None:
    workers.beat(
        session,
        worker_id=worker_id,
        hostname="host",
        pid=1,
        queues=["interactive"],
        models=models,
        device="cpu",
        metrics=[],
    )
    session.commit()


def test_heartbeats_tell_live_workers_from_gone_ones(db_url: str) -> None:
    factory = make_sessionmaker(make_engine(db_url))
    with factory() as session:
        _beat(session, "a:1", ["m1"])
        _beat(session, "b:2", ["m2"])
        _beat(session, "a:1", ["m1", "m3"])  # a second beat updates the row
        assert [(w.id, w.models) for w in workers.live(session, interval_s=5)] == [
            ("a:1", ["m1", "m3"]),
            ("b:2", ["m2"]),
        ]
        later = utcnow() + timedelta(seconds=16)  # three beats of 5 s missed, and one more
        assert workers.live(session, interval_s=5, now=later) == []
        assert len(workers.recent(session)) == 2
        workers.forget(session, worker_id="b:2")
        session.commit()
        assert [w.id for w in workers.recent(session)] == ["a:1"]
        assert workers.forget_gone(session, now=utcnow() + workers.FORGET_AFTER / 2) == 0
        assert workers.forget_gone(session, now=utcnow() + workers.FORGET_AFTER * 2) == 1
        session.commit()
        assert session.query(WorkerHeartbeat).count() == 0


def test_a_heartbeat_thread_writes_its_metrics_and_removes_its_row(db_url: str) -> None:
    factory = make_sessionmaker(make_engine(db_url))
    heartbeat = telemetry.Heartbeat(
        factory, queues=["interactive"], models=["tiny-random-llama"], device="cpu", interval_s=5
    )
    telemetry.count_tokens("tiny-random-llama", 5)
    heartbeat.beat()
    with factory() as session:
        row = session.get(WorkerHeartbeat, heartbeat.worker_id)
        assert row is not None and row.models == ["tiny-random-llama"]
        names = {family["name"] for family in row.metrics}
        assert {"genserve_generated_tokens", "genserve_tokens_per_second"} <= names
        made = next(f for f in row.metrics if f["name"] == "genserve_generated_tokens")
        assert any(
            labels == {"model": "tiny-random-llama"} and value >= 5
            for _, labels, value in made["samples"]
        )
    heartbeat.stop()
    with factory() as session:
        assert session.get(WorkerHeartbeat, heartbeat.worker_id) is None


def _settings(url: str, tmp_path: Path, **values: object) -> Settings:
    return Settings(
        database_url=url,
        data_dir=tmp_path,
        environment="test",
        chat_models=["tiny-random-llama"],
        **values,  # type: ignore[arg-type]
    )


def _families(http: TestClient) -> dict[str, list[tuple[dict[str, str], float]]]:
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def test_metrics_count_queued_jobs_requests_and_workers(db_url: str, tmp_path: Path) -> None:
    factory = make_sessionmaker(make_engine(db_url))
    with factory() as session:
        tenant_id, key = make_key(session)
        queued = [make_job(session, tenant_id) for _ in range(3)]
        crud.claim_job(session, job_id=queued[0].id, lease_s=60)  # one runs
        session.commit()
        _beat(session, "w:1", ["tiny-random-llama"])
    with TestClient(create_app(_settings(db_url, tmp_path))) as http:
        assert http.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        found = _families(http)
    jobs = {(labels["queue"], labels["status"]): value for labels, value in found["genserve_jobs"]}
    assert jobs[("interactive", "queued")] == 2 and jobs[("interactive", "running")] == 1
    assert jobs[("batch", "queued")] == 0 and jobs[("train", "queued")] == 0
    depth = {labels["queue"]: value for labels, value in found["genserve_queue_depth"]}
    assert depth["interactive"] == 2
    oldest = {labels["queue"]: v for labels, v in found["genserve_queue_oldest_age_seconds"]}
    assert oldest["interactive"] > 0 and oldest["batch"] == 0
    assert found["genserve_worker_up"] == [({"worker": "w:1", "device": "cpu"}, 1.0)]
    assert found["genserve_model_workers"] == [({"model": "tiny-random-llama"}, 1.0)]
    assert found["genserve_database_up"] == [({}, 1.0)]
    listed = [
        value
        for labels, value in found["genserve_http_request_duration_seconds_count"]
        if labels == {"method": "GET", "route": "/v1/jobs", "status": "200"}
    ]
    assert listed and listed[0] >= 1
    indexes = {labels["index"] for labels, _ in found["genserve_index_vectors"]}
    assert indexes == {"generations", "chunks"}


def test_readyz_names_the_model_no_worker_serves(sqlite_url: str, tmp_path: Path) -> None:
    with TestClient(create_app(_settings(sqlite_url, tmp_path))) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        missing = http.get("/readyz")
        assert missing.status_code == 503
        body = missing.json()
        assert body["status"] == "not ready"
        assert body["checks"]["database"] == {"ok": True} and body["checks"]["broker"]["ok"]
        assert "tiny-random-llama" in body["checks"]["workers"]["error"]
        factory = make_sessionmaker(make_engine(sqlite_url))
        with factory() as session:
            _beat(session, "w:1", ["another-model"])
        assert http.get("/readyz").status_code == 503
        with factory() as session:
            _beat(session, "w:2", ["tiny-random-llama"])
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert ready.json()["checks"]["workers"]["models"] == {"tiny-random-llama": 1}


def test_readyz_names_a_broker_it_cannot_reach(sqlite_url: str, tmp_path: Path) -> None:
    settings = _settings(sqlite_url, tmp_path, broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings)) as http:
        answer = http.get("/readyz")
    assert answer.status_code == 503
    broker = answer.json()["checks"]["broker"]
    assert broker["ok"] is False and broker["error"]


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_requests_are_logged_once_with_their_id_and_never_the_key(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, fmt: str
) -> None:
    with make_sessionmaker(make_engine(sqlite_url))() as session:
        _, key = make_key(session)
    caplog.set_level(logging.INFO, logger="genserve.access")
    caplog.handler.addFilter(logs.ContextIds())  # what configure() puts on its handler
    with TestClient(create_app(_settings(sqlite_url, tmp_path))) as http:
        answer = http.get("/v1/jobs?limit=5", headers={"Authorization": f"Bearer {key}"})
    request_id = answer.headers["x-request-id"]
    mine = [r for r in caplog.records if getattr(r, "request_id", None) == request_id]
    access = [r for r in mine if r.name == "genserve.access"]
    assert len(access) == 1
    formatter = logs.JsonFormatter() if fmt == "json" else logs.TextFormatter()
    line = formatter.format(access[0])
    assert request_id in line and "/v1/jobs" in line and key not in line
    assert "limit=5" not in line  # no query string: no secret put in one is logged
    if fmt == "json":
        parsed = json.loads(line)
        assert parsed["route"] == "/v1/jobs" and parsed["status"] == 200
        assert parsed["duration_ms"] >= 0
