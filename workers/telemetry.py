"""A worker process's metrics, and the heartbeat that carries them to the database.

The metrics are prometheus_client's, on this process's own registry. Every few seconds
the heartbeat writes them, with what the worker serves, to its row of worker_heartbeats;
the API's /metrics republishes each live worker's families with a `worker` label, so one
scrape of any API replica sees every worker, on any broker, without reaching them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.db import workers
from service.db.tables import utcnow

logger = logging.getLogger("genserve.worker")

REGISTRY = CollectorRegistry(auto_describe=False)

GENERATED_TOKENS = Counter(
    "genserve_generated_tokens",
    "Tokens generated, by model.",
    ["model"],
    registry=REGISTRY,
)
TOKENS_PER_SECOND = Gauge(
    "genserve_tokens_per_second",
    "Tokens generated a second over the last heartbeat interval, by model.",
    ["model"],
    registry=REGISTRY,
)
JOBS_FINISHED = Counter(
    "genserve_jobs_finished",
    "Jobs this worker ended, by queue, model and final status.",
    ["queue", "model", "status"],
    registry=REGISTRY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "genserve_time_to_first_token_seconds",
    "From the job's submission to its first token, by model.",
    ["model"],
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "genserve_batch_size",
    "Sequences decoded together in one engine step, by model.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    registry=REGISTRY,
)
RUNNING_SEQUENCES = Gauge(
    "genserve_running_sequences",
    "Sequences in the model's batch after the last engine step.",
    ["model"],
    registry=REGISTRY,
)


def count_tokens(model: str, tokens: int) -> None:
    if tokens > 0:
        GENERATED_TOKENS.labels(model).inc(tokens)


def _tokens_by_model() -> dict[str, float]:
    """GENERATED_TOKENS's totals, as the registry reads them."""
    return {
        sample.labels["model"]: sample.value
        for family in GENERATED_TOKENS.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def first_token(model: str, submitted_at: datetime) -> None:
    """A job's first token is out: observe the time since it was submitted."""
    TIME_TO_FIRST_TOKEN.labels(model).observe(max(0.0, (utcnow() - submitted_at).total_seconds()))


def engine_step(model: str, batch: int, running_after: int) -> None:
    BATCH_SIZE.labels(model).observe(batch)
    RUNNING_SEQUENCES.labels(model).set(running_after)


def snapshot(registry: CollectorRegistry = REGISTRY) -> list[dict[str, Any]]:
    """The registry's families as JSON: name, type, help and samples [name, labels, value]."""
    return [
        {
            "name": family.name,
            "type": family.type,
            "help": family.documentation,
            "samples": [
                [sample.name, sample.labels, sample.value]
                for sample in family.samples
                if not sample.name.endswith("_created")
            ],
        }
        for family in registry.collect()
    ]


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Heartbeat:
    """Writes this process's row of worker_heartbeats every interval, on a daemon thread.

    Args:
        factory: Sessions on the service's database.
        queues: The queues this worker consumes.
        models: The chat models it serves (loaded before the first beat).
        device: Where its models run.
        interval_s: Seconds between beats.
    """

    def __init__(
        self,
        factory: sessionmaker[Session],
        *,
        queues: Sequence[str],
        models: Sequence[str],
        device: str,
        interval_s: float,
    ) -> None:
        self._factory = factory
        self.worker_id = worker_id()
        self._queues = tuple(queues)
        self._models = tuple(models)
        self._device = device
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: tuple[float, dict[str, float]] = (time.monotonic(), {})

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="genserve-heartbeat", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop beating and remove the row, so the worker is gone at once, not in 3 beats."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            with self._factory() as session:
                workers.forget(session, worker_id=self.worker_id)
                session.commit()
        except SQLAlchemyError as exc:
            logger.warning("could not remove the heartbeat of %s: %s", self.worker_id, exc)

    def beat(self) -> None:
        self._update_rates()
        with self._factory() as session:
            workers.beat(
                session,
                worker_id=self.worker_id,
                hostname=socket.gethostname(),
                pid=os.getpid(),
                queues=self._queues,
                models=self._models,
                device=self._device,
                metrics=snapshot(),
            )
            session.commit()

    def _update_rates(self) -> None:
        now = time.monotonic()
        totals = _tokens_by_model()
        then, before = self._last
        elapsed = now - then
        for model in set(totals) | set(self._models):
            made = totals.get(model, 0) - before.get(model, 0)
            TOKENS_PER_SECOND.labels(model).set(made / elapsed if elapsed > 0 else 0.0)
        self._last = (now, totals)

    def _run(self) -> None:
        while True:
            try:
                self.beat()
            except SQLAlchemyError as exc:
                logger.warning("heartbeat failed, will retry: %s", exc)
            if self._stop.wait(self._interval_s):
                return
