"""What observability costs, side by side in one run.

1. Per request: the API as it runs (RequestContext: a request id in every log record, a
   latency histogram by route, one JSON access line) against the same app whose outer
   middleware only sets the request id. Both in process, request by request in turn, on
   GET /healthz (the cost alone) and GET /v1/jobs (a real read); medians of all requests.
2. Per scrape: GET /metrics on PostgreSQL with a history of --jobs jobs (a few thousand
   queued or running among them) and --workers heartbeats, against GET /healthz.

    .venv/bin/python bench/observability.py --jobs 1000000 --repeats 5

Prints a JSON object last: per-request medians in microseconds and their ratio, and the
scrape's p50/p99 in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import text
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service import logs  # noqa: E402
from service.api.app import create_app  # noqa: E402
from service.api.middleware import RequestContext  # noqa: E402
from service.config import Settings  # noqa: E402
from service.db import tenants, workers  # noqa: E402
from service.db.migrate import upgrade  # noqa: E402
from service.db.session import make_engine, make_sessionmaker  # noqa: E402
from tests.conftest import create_pg_database, drop_pg_database  # noqa: E402
from workers import telemetry  # noqa: E402

MODEL = "tiny-random-llama"


class IdOnly:
    """The baseline's outer middleware: the request id the inner one needs, nothing else."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})["request_id"] = "0" * 16
        await self.app(scope, receive, send)


def _app(settings: Settings, *, observed: bool) -> Any:
    app = create_app(settings)
    if not observed:
        app.user_middleware = [
            Middleware(IdOnly) if entry.cls is RequestContext else entry
            for entry in app.user_middleware
        ]
    return app


def _json_logs_to_devnull() -> None:
    """Production's logging, formatted in full and written to /dev/null."""
    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115 - for the run
    handler.addFilter(logs.ContextIds())
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.INFO)


def per_request(tmp: Path, *, requests: int, repeats: int) -> dict[str, Any]:
    url = f"sqlite:///{tmp / 'requests.sqlite'}"
    upgrade(url)
    with make_sessionmaker(make_engine(url))() as session:
        _, key = tenants.create_api_key(session, tenant_name="bench", role="writer")
        session.commit()
    settings = Settings(database_url=url, data_dir=tmp, environment="test", chat_models=[MODEL])
    headers = {"Authorization": f"Bearer {key}"}
    paths = {"healthz": "/healthz", "jobs": "/v1/jobs?limit=20"}
    timings: dict[str, dict[str, list[float]]] = {
        name: {"observed": [], "baseline": []} for name in paths
    }
    with (
        TestClient(_app(settings, observed=True)) as observed,
        TestClient(_app(settings, observed=False)) as baseline,
    ):
        clients = {"observed": observed, "baseline": baseline}
        for client in clients.values():  # warm both
            for path in paths.values():
                for _ in range(50):
                    assert client.get(path, headers=headers).status_code == 200
        # Request by request, the variants in turn (and in turn first): a burst of noise
        # from elsewhere falls on both, and the medians step over it.
        for number in range(requests * repeats):
            order = list(clients.items())
            if number % 2:
                order.reverse()
            for name, path in paths.items():
                for variant, client in order:
                    started = time.perf_counter()
                    client.get(path, headers=headers)
                    timings[name][variant].append((time.perf_counter() - started) * 1e6)
    result: dict[str, Any] = {}
    for name, by_variant in timings.items():
        observed_us = statistics.median(by_variant["observed"])
        baseline_us = statistics.median(by_variant["baseline"])
        result[name] = {
            "observed_us": round(observed_us, 1),
            "baseline_us": round(baseline_us, 1),
            "added_us": round(observed_us - baseline_us, 1),
            "ratio": round(observed_us / baseline_us, 3),
        }
    return result


def _fill(url: str, jobs: int, worker_count: int) -> float:
    """jobs over 90 days, ids sorting by time; one in 500 queued, one in 2000 running."""
    started = time.perf_counter()
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO tenants (id, name, created_at, redact_pii) "
                "VALUES (1, 'bench', now(), false)"
            )
        )
        connection.execute(
            text(
                """INSERT INTO jobs (id, tenant_id, model, queue, status, input, params,
                        metadata, attempts, publish_count, cancel_requested, api, store,
                        created_at)
                   SELECT 'job_' || lpad(to_hex(ms), 12, '0') || lpad(to_hex(i), 12, '0'),
                          1, 'model-' || (i % 3),
                          (ARRAY['interactive', 'batch', 'embed'])[1 + i % 3],
                          CASE WHEN i % 500 = 0 THEN 'queued'
                               WHEN i % 2000 = 1 THEN 'running'
                               ELSE 'succeeded' END,
                          '{}', '{}', '{}', 1, 1, false, 'jobs', false,
                          to_timestamp(ms / 1000.0)
                   FROM (SELECT i, (extract(epoch FROM now()) * 1000)::bigint
                                   - ((:n - i)::bigint * 7776000000 / :n) AS ms
                         FROM generate_series(1, :n) AS i) AS s"""
            ),
            {"n": jobs},
        )
        connection.execute(text("ANALYZE"))
    # Workers with what a busy one reports: two models' tokens, batches, first tokens.
    for model in (MODEL, "smollm2-135m-instruct"):
        telemetry.count_tokens(model, 12345)
        for size in (1, 4, 16, 32):
            telemetry.engine_step(model, size, size)
        telemetry.TIME_TO_FIRST_TOKEN.labels(model).observe(0.08)
        telemetry.JOBS_FINISHED.labels("interactive", model, "succeeded").inc(100)
    snapshot = telemetry.snapshot()
    with make_sessionmaker(engine)() as session:
        for number in range(worker_count):
            workers.beat(
                session,
                worker_id=f"gpu-host-{number}:1",
                hostname=f"gpu-host-{number}",
                pid=1,
                queues=["interactive", "batch"],
                models=[MODEL, "smollm2-135m-instruct"],
                device="cuda:0",
                metrics=snapshot,
            )
        session.commit()
    engine.dispose()
    return time.perf_counter() - started


def per_scrape(tmp: Path, *, jobs: int, worker_count: int, scrapes: int) -> dict[str, Any]:
    url = create_pg_database()
    try:
        upgrade(url)
        fill_s = _fill(url, jobs, worker_count)
        settings = Settings(
            database_url=url,
            data_dir=tmp / "scrape",
            environment="test",
            chat_models=[MODEL],
            heartbeat_interval_s=3600,  # the planted heartbeats stay live
        )
        with TestClient(create_app(settings)) as client:
            for _ in range(5):
                client.get("/metrics")
            page = client.get("/metrics").text
            measured: dict[str, list[float]] = {"metrics": [], "healthz": []}
            for _ in range(scrapes):
                for name in measured:
                    started = time.perf_counter()
                    assert client.get(f"/{name}").status_code == 200
                    measured[name].append((time.perf_counter() - started) * 1000)
        result: dict[str, Any] = {"jobs": jobs, "workers": worker_count, "fill_s": round(fill_s, 1)}
        result["page_bytes"] = len(page)
        result["series"] = sum(1 for line in page.splitlines() if line and line[0] != "#")
        for name, values in measured.items():
            values.sort()
            result[name] = {
                "p50_ms": round(statistics.median(values), 2),
                "p99_ms": round(values[min(len(values) - 1, int(len(values) * 0.99))], 2),
            }
        return result
    finally:
        drop_pg_database(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="requests per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--scrapes", type=int, default=200)
    args = parser.parse_args()
    _json_logs_to_devnull()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        requests = per_request(tmp, requests=args.requests, repeats=args.repeats)
        for name, row in requests.items():
            print(
                f"{name:8s} observed {row['observed_us']:8.1f} us  baseline "
                f"{row['baseline_us']:8.1f} us  +{row['added_us']:.1f} us  x{row['ratio']}",
                file=sys.stderr,
            )
        scrape = per_scrape(tmp, jobs=args.jobs, worker_count=args.workers, scrapes=args.scrapes)
        print(
            f"/metrics with {args.jobs} jobs and {args.workers} workers: "
            f"p50 {scrape['metrics']['p50_ms']} ms, p99 {scrape['metrics']['p99_ms']} ms "
            f"({scrape['series']} series); /healthz p50 {scrape['healthz']['p50_ms']} ms",
            file=sys.stderr,
        )
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                f"Python {platform.python_version()}",
                "requests": requests,
                "scrape": scrape,
            }
        )
    )


if __name__ == "__main__":
    main()
