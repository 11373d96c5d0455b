"""Celery tasks: ids in, one function of workers.jobs called. Logic lives there."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.signals import (
    task_postrun,
    task_prerun,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)
from sqlalchemy.exc import OperationalError

from service import batches, logs
from service.queue import FINALIZE_BATCH_TASK, PREPARE_BATCH_TASK, RUN_JOB_TASK, TRAIN_MODEL_TASK
from workers import jobs, training
from workers.app import app
from workers.context import get_context, preload, shutdown

logger = logging.getLogger("genserve.worker")


class JobTask(Task):
    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        # The one place an unexpected error ends a job: it fails with its reason and the
        # worker goes on serving.
        job_id = args[0] if args else kwargs.get("job_id")
        logger.error("job %s failed: %r", job_id, exc, exc_info=exc)
        jobs.fail_job(get_context().sessionmaker, job_id, f"{type(exc).__name__}: {exc}")


# Every task: acknowledged once its work is stored, redelivered if its worker is lost, and
# retried while the database is away (each task's claim in SQL makes a retry safe).
DURABLE: dict[str, Any] = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "autoretry_for": (OperationalError,),
    "retry_backoff": True,
    "retry_backoff_max": 60,
    "max_retries": 10,
}


TRAINING_BUSY_RETRY_S = 15


@app.task(name=RUN_JOB_TASK, base=JobTask, **DURABLE)
def run_job(job_id: str) -> str:
    context = get_context()
    outcome = jobs.run_job(
        context.sessionmaker,
        context.runtime,
        job_id,
        leases=context.leases,
        embedding_model=context.embedding_model,
        artifacts_dir=context.artifacts_dir,
        events=context.events,
        time_limit_s=context.job_time_limit_s,
        ingestion_time_limit_s=context.ingestion_time_limit_s,
        export_time_limit_s=context.export_time_limit_s,
    )
    logger.info("job %s: %s", job_id, outcome.status)
    if outcome.batch_id and outcome.status != "skipped":
        with context.sessionmaker() as session:
            batches.start_finalizing(session, context.publisher, batch_id=outcome.batch_id)
    return outcome.status


class TrainingTask(Task):
    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        job_id = args[0] if args else kwargs.get("training_job_id")
        logger.error("training job %s failed: %r", job_id, exc, exc_info=exc)
        training.fail_training(get_context().sessionmaker, job_id, f"{type(exc).__name__}: {exc}")


@app.task(name=TRAIN_MODEL_TASK, base=TrainingTask, bind=True, **DURABLE)
def train_model(self: Task, training_job_id: str) -> str:
    context = get_context()
    # A worker trains training_concurrency models at once; another job waits its turn in
    # the broker (still queued in SQL), not in a thread of this worker.
    if not context.training_slots.acquire(blocking=False):
        raise self.retry(countdown=TRAINING_BUSY_RETRY_S, max_retries=None)
    try:
        status = training.run_training(
            context.sessionmaker,
            training_job_id,
            artifacts_dir=context.artifacts_dir,
            device=context.runtime.device,
            lease_s=context.lease_s,
            time_limit_s=context.training_time_limit_s,
        )
    finally:
        context.training_slots.release()
    logger.info("training job %s: %s", training_job_id, status)
    return status


@app.task(name=PREPARE_BATCH_TASK, **DURABLE)
def prepare_batch(batch_id: str) -> str:
    context = get_context()
    status = batches.prepare_batch(
        context.sessionmaker,
        context.publisher,
        batch_id,
        models=context.models,
        lease_s=context.lease_s,
    )
    logger.info("batch %s: %s", batch_id, status)
    return status


@app.task(name=FINALIZE_BATCH_TASK, **DURABLE)
def finalize_batch(batch_id: str) -> str:
    context = get_context()
    status = batches.finalize_batch(context.sessionmaker, batch_id, lease_s=context.lease_s)
    logger.info("batch %s: %s", batch_id, status)
    return status


@worker_process_init.connect
def _preload_in_child(**_: Any) -> None:
    preload()


@worker_ready.connect
def _preload_in_main(sender: Any = None, **_: Any) -> None:
    # solo and threads pools run tasks in the main process; prefork children load their own.
    pool = getattr(getattr(sender, "pool_cls", None), "__module__", "")
    if "prefork" not in pool:
        preload()


@worker_process_shutdown.connect
@worker_shutdown.connect
def _forget_heartbeat(**_: Any) -> None:
    shutdown()


# Each task's records carry its object's id, and the id of the request that submitted it
# (the API puts it in the message's headers; service/queue.py).
_task_ids: dict[str, Any] = {}


@task_prerun.connect
def _bind_ids(task_id: str = "", task: Task | None = None, args: Any = (), **_: Any) -> None:
    request_id = getattr(task.request, logs.REQUEST_ID_HEADER, None) if task else None
    job_id = args[0] if args else None
    _task_ids[task_id] = (
        logs.request_id.set(request_id),
        logs.job_id.set(job_id),
    )


@task_postrun.connect
def _unbind_ids(task_id: str = "", **_: Any) -> None:
    tokens = _task_ids.pop(task_id, None)
    if tokens is not None:
        logs.job_id.reset(tokens[1])
        logs.request_id.reset(tokens[0])
