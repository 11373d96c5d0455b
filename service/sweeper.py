"""Rule 2's sweeper: re-publish jobs whose broker message may have been lost.

Batches are swept too: one whose prepare or finalize task was lost is sent again, one
whose lines have all ended is finalized, one past its window expires. Where the history is
partitioned by month (service/db/partitions.py), the coming months' partitions are made
once an hour.

A job stays queued too long when the API died between commit and publish, or the broker
lost its messages (Redis without persistence, the embedded broker after a SIGKILLed
worker). A running job whose lease expired lost its worker. Re-publishing is safe
because the worker's claim is a conditional UPDATE: a job runs once however many
messages name it.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service import batches
from service.db import crud, partitions, training, workers
from service.db.tables import Job, TrainingJob, utcnow
from service.queue import TRAIN_MODEL_TASK, TRAIN_QUEUE, JobPublisher

logger = logging.getLogger("genserve.sweeper")

MAX_BACKOFF_DOUBLINGS = 5
# The API publishes right after its commit; give it this long before stepping in.
NEVER_PUBLISHED_GRACE_S = 5.0
PARTITIONS_EVERY_S = 3600.0


def _due(job: Job | TrainingJob, now: datetime, requeue_after_s: float) -> bool:
    if job.status != "queued" or job.published_at is None:
        return True
    doublings = min(max(job.publish_count - 1, 0), MAX_BACKOFF_DOUBLINGS)
    return job.published_at < now - timedelta(seconds=requeue_after_s * 2**doublings)


def sweep_once(
    session: Session, publisher: JobPublisher, *, requeue_after_s: float, max_attempts: int
) -> int:
    """Re-publish the jobs that are due; returns how many were published."""
    now = utcnow()
    stale = crud.stale_jobs(
        session,
        now=now,
        requeue_after_s=requeue_after_s,
        never_published_after_s=min(NEVER_PUBLISHED_GRACE_S, requeue_after_s),
    )
    published = 0
    for job in stale:
        if not _due(job, now, requeue_after_s):
            continue
        if crud.requeue_job(session, job=job, max_attempts=max_attempts):
            logger.info(
                "re-publishing job %s (status was %s, publish %d)",
                job.id,
                job.status,
                job.publish_count + 1,
            )
            published += publisher.publish(job.id, job.queue)
    return published


def sweep_training(
    session: Session, publisher: JobPublisher, *, requeue_after_s: float, max_attempts: int
) -> int:
    """The same for training jobs: re-publish the lost ones, fail the ones out of attempts."""
    now = utcnow()
    published = 0
    for job in training.stale_training_jobs(session, now=now, requeue_after_s=requeue_after_s):
        if _due(job, now, requeue_after_s) and crud.requeue_job(
            session, job=job, max_attempts=max_attempts
        ):
            logger.info("re-publishing training job %s (status was %s)", job.id, job.status)
            published += publisher.send(TRAIN_MODEL_TASK, job.id, queue=TRAIN_QUEUE)
    return published


class Sweeper:
    """Runs sweep_once every interval on a daemon thread until stopped."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        publisher: JobPublisher,
        *,
        interval_s: float,
        requeue_after_s: float,
        max_attempts: int,
    ) -> None:
        self._factory = factory
        self._publisher = publisher
        self._interval_s = interval_s
        self._requeue_after_s = requeue_after_s
        self._max_attempts = max_attempts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="genserve-sweeper", daemon=True)
        self._partitions_due = 0.0  # time.monotonic() of the next partitions check

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                with self._factory() as session:
                    sweep_once(
                        session,
                        self._publisher,
                        requeue_after_s=self._requeue_after_s,
                        max_attempts=self._max_attempts,
                    )
                    sweep_training(
                        session,
                        self._publisher,
                        requeue_after_s=self._requeue_after_s,
                        max_attempts=self._max_attempts,
                    )
                    batches.sweep_batches(
                        session, self._publisher, now=utcnow(), grace_s=self._requeue_after_s
                    )
                    if time.monotonic() >= self._partitions_due:
                        self._partitions_due = time.monotonic() + PARTITIONS_EVERY_S
                        partitions.ensure_partitions(session.connection(), now=utcnow())
                        workers.forget_gone(session, now=utcnow())
                        session.commit()
            except SQLAlchemyError as exc:
                logger.warning("sweep failed, will retry: %s", exc)
