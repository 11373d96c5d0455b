"""What a worker process keeps for its lifetime: one engine, one runtime, plain settings."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from service.batches import Models
from service.config import Settings, get_settings
from service.db.session import make_engine, make_sessionmaker
from service.events import EventSink, make_sink
from service.queue import JobPublisher
from workers.engine.engine import EngineLimits
from workers.engine.runtime import ModelRuntime
from workers.leases import LeaseKeeper
from workers.telemetry import Heartbeat

# The queues whose jobs run chat models: a worker consuming neither serves none.
GENERATION_QUEUES = ("interactive", "batch")


@dataclass(frozen=True)
class WorkerContext:
    sessionmaker: sessionmaker[Session]
    runtime: ModelRuntime
    embedding_model: str
    chat_models: tuple[str, ...]
    lease_s: float
    leases: LeaseKeeper
    job_time_limit_s: float
    training_time_limit_s: float
    ingestion_time_limit_s: float
    export_time_limit_s: float
    events: EventSink
    # The worker's own Celery app, for the jobs a batch creates.
    publisher: JobPublisher
    artifacts_dir: Path
    training_slots: threading.BoundedSemaphore
    heartbeat: Heartbeat

    @property
    def models(self) -> Models:
        return Models(chat=self.chat_models, embedding=self.embedding_model)


_context: WorkerContext | None = None
_lock = threading.Lock()


def build_context(settings: Settings) -> WorkerContext:
    from workers.app import app

    factory = make_sessionmaker(make_engine(settings.sqlalchemy_url, **_pool(settings)))
    limits = EngineLimits(
        max_batch=settings.max_batch, max_prefill_tokens=settings.max_prefill_tokens
    )
    runtime = ModelRuntime(
        cache_dir=settings.models_dir,
        device=settings.device,
        limits=limits,
        embedding_runtime=settings.embedding_runtime,
    )
    serves = any(queue in settings.worker_queues for queue in GENERATION_QUEUES)
    return WorkerContext(
        sessionmaker=factory,
        runtime=runtime,
        embedding_model=settings.embedding_model,
        chat_models=tuple(settings.chat_models),
        lease_s=settings.job_lease_s,
        leases=LeaseKeeper(factory, lease_s=settings.job_lease_s),
        job_time_limit_s=settings.job_time_limit_s,
        training_time_limit_s=settings.training_time_limit_s,
        ingestion_time_limit_s=settings.ingestion_time_limit_s,
        export_time_limit_s=settings.export_time_limit_s,
        events=make_sink(settings.events_backend_url),
        publisher=JobPublisher(app),
        artifacts_dir=settings.resolved_artifacts_dir,
        training_slots=threading.BoundedSemaphore(settings.training_concurrency),
        heartbeat=Heartbeat(
            factory,
            queues=settings.worker_queues,
            models=settings.chat_models if serves else [],
            device=str(runtime.device),
            interval_s=settings.heartbeat_interval_s,
        ),
    )


def _pool(settings: Settings) -> dict[str, int]:
    """Connections for the job threads at their busiest (each holds one only briefly)."""
    return {"pool_size": min(settings.worker_slots, 20), "max_overflow": 10}


def get_context() -> WorkerContext:
    """This process's context, built on first use (after a prefork child is forked)."""
    global _context
    with _lock:
        if _context is None:
            _context = build_context(get_settings())
        return _context


def preload() -> None:
    """Load the embedding model and every served chat model before the first job, then
    start the heartbeat: from its first beat the worker is ready for them (/readyz)."""
    context = get_context()
    context.runtime.embedder(context.embedding_model)
    for name in context.chat_models:
        context.runtime.chat_model(name)
    context.heartbeat.start()


def shutdown() -> None:
    """On the way out: remove this process's heartbeat (if it ever started)."""
    with _lock:
        context = _context
    if context is not None:
        context.heartbeat.stop()
