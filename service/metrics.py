"""What /metrics shows, in Prometheus's text format.

Three sources, one page:

- this API process's own metrics (REGISTRY): request latency by route, cache lookups;
- the state in SQL, read at scrape time (StateCollector): jobs queued and running by
  queue, the age of the oldest queued job, workers and their heartbeats;
- every live worker's metrics (tokens, batch sizes, time to first token, jobs finished),
  as its last heartbeat wrote them, each sample labelled with its worker;
- the vector indexes of this process: their size and how far they trail SQL.

No tenant appears in a label: the page is about the service, not about anyone's data.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, literal, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.config import QUEUES
from service.db import workers
from service.db.tables import Job, TrainingJob, utcnow
from service.queue import TRAIN_QUEUE
from service.search.index import VectorIndex

logger = logging.getLogger("genserve.api")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ACTIVE_STATUSES = ("queued", "running")

REGISTRY = CollectorRegistry(auto_describe=False)
REQUEST_DURATION = Histogram(
    "genserve_http_request_duration_seconds",
    "HTTP requests by method, route template and status, until the answer's last byte.",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
CACHE_LOOKUPS = Counter(
    "genserve_cache_lookups",
    "Response cache lookups by result: exact or semantic hit, or miss.",
    ["result"],
    registry=REGISTRY,
)


class StateCollector(Collector):
    """Reads the service's state from SQL and the process's indexes at each scrape.

    Args:
        factory: Sessions on the service's database.
        indexes: This process's vector indexes, by name.
        heartbeat_interval_s: The workers' beat; three missed beats and a worker is down.
    """

    def __init__(
        self,
        factory: sessionmaker[Session],
        indexes: dict[str, VectorIndex],
        *,
        heartbeat_interval_s: float,
    ) -> None:
        self._factory = factory
        self._indexes = indexes
        self._interval_s = heartbeat_interval_s

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("genserve_database_up", "Whether the scrape could read SQL.")
        try:
            with self._factory() as session:
                now = utcnow()
                families = [
                    *_job_families(session, now),
                    *_worker_families(session, now, self._interval_s),
                    *_index_families(session, now, self._indexes),
                ]
        except SQLAlchemyError as exc:
            logger.warning("metrics could not read the database: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families


def render(*registries: CollectorRegistry) -> bytes:
    """The exposition text of the registries, one after another (no family in two)."""
    return b"".join(generate_latest(registry) for registry in registries)


def route_label(scope: MutableMapping[str, Any]) -> str:
    """The route's template (/v1/jobs/{job_id}), never the raw path: bounded labels."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


# --- jobs and queues ------------------------------------------------------------------------


def _job_families(session: Session, now: datetime) -> list[Metric]:
    jobs = GaugeMetricFamily(
        "genserve_jobs", "Jobs queued or running, by queue and status.", labels=["queue", "status"]
    )
    depth = GaugeMetricFamily(
        "genserve_queue_depth", "Jobs waiting for a worker, by queue.", labels=["queue"]
    )
    oldest = GaugeMetricFamily(
        "genserve_queue_oldest_age_seconds",
        "Age of the oldest job waiting, by queue (0 when none waits).",
        labels=["queue"],
    )
    counts: dict[tuple[str, str], tuple[int, datetime | None]] = {
        (queue, status): (0, None) for queue in QUEUES for status in ACTIVE_STATUSES
    }
    counts.update(_active(session, Job, Job.queue))
    counts.update(_active(session, TrainingJob, None))
    for (queue, status), (count, _) in sorted(counts.items()):
        jobs.add_metric([queue, status], count)
    for queue in sorted({queue for queue, _ in counts}):
        count, first = counts[(queue, "queued")]
        depth.add_metric([queue], count)
        oldest.add_metric([queue], (now - first).total_seconds() if first else 0.0)
    return [jobs, depth, oldest]


def _active(
    session: Session, table: Any, queue_column: Any
) -> dict[tuple[str, str], tuple[int, datetime | None]]:
    """(queue, status) -> (count, oldest created_at) of the table's queued and running rows
    (an index on status answers it; terminal rows are never read)."""
    queue = queue_column if queue_column is not None else literal(TRAIN_QUEUE)
    rows = session.execute(
        select(queue, table.status, func.count(), func.min(table.created_at))
        .where(table.status.in_(ACTIVE_STATUSES))
        .group_by(queue, table.status)
    ).all()
    return {(q, status): (count, first) for q, status, count, first in rows}


# --- workers --------------------------------------------------------------------------------


def _worker_families(session: Session, now: datetime, interval_s: float) -> list[Metric]:
    up = GaugeMetricFamily(
        "genserve_worker_up",
        "1 while the worker beats, 0 once it missed three beats (until it is forgotten).",
        labels=["worker", "device"],
    )
    last = GaugeMetricFamily(
        "genserve_worker_last_heartbeat_timestamp_seconds",
        "When the worker last beat (Unix time).",
        labels=["worker"],
    )
    serving = GaugeMetricFamily(
        "genserve_model_workers", "Live workers serving the model.", labels=["model"]
    )
    since = workers.live_since(interval_s, now)
    per_model: dict[str, int] = {}
    republished: dict[str, Metric] = {}
    for row in workers.recent(session):
        alive = row.seen_at >= since
        up.add_metric([row.id, row.device], 1 if alive else 0)
        last.add_metric([row.id], row.seen_at.timestamp())
        if not alive:
            continue
        for model in row.models:
            per_model[model] = per_model.get(model, 0) + 1
        _republish(republished, row.id, row.metrics)
    for model, count in sorted(per_model.items()):
        serving.add_metric([model], count)
    return [up, last, serving, *republished.values()]


def _republish(into: dict[str, Metric], worker: str, families: Sequence[dict[str, Any]]) -> None:
    """Add a worker's families (workers/telemetry.snapshot) with its `worker` label."""
    for family in families:
        metric = into.get(family["name"])
        if metric is None:
            metric = into[family["name"]] = Metric(family["name"], family["help"], family["type"])
        for name, labels, value in family["samples"]:
            metric.add_sample(name, {**labels, "worker": worker}, value)


# --- indexes --------------------------------------------------------------------------------


def _index_families(
    session: Session, now: datetime, indexes: dict[str, VectorIndex]
) -> Iterable[Metric]:
    size = GaugeMetricFamily(
        "genserve_index_vectors", "Vectors in this process's index.", labels=["index"]
    )
    pending = GaugeMetricFamily(
        "genserve_index_pending_rows",
        "Rows stored in SQL that the index has not read yet.",
        labels=["index"],
    )
    lag = GaugeMetricFamily(
        "genserve_index_lag_seconds",
        "Age of the oldest row the index has not read yet (0 when caught up).",
        labels=["index"],
    )
    ready = GaugeMetricFamily(
        "genserve_index_ready", "1 once the index is loaded or built.", labels=["index"]
    )
    for name, index in sorted(indexes.items()):
        rows = index.source.rows
        count, first = session.execute(
            select(func.count(), func.min(rows.created_at)).where(rows.id > index.last_id)
        ).one()
        ready.add_metric([name], 1 if index.ready else 0)
        size.add_metric([name], index.ntotal)
        pending.add_metric([name], count)
        lag.add_metric([name], (now - first).total_seconds() if first else 0.0)
    return [ready, size, pending, lag]
