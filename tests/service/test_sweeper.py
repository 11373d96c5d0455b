"""The sweeper re-publishes lost jobs through a real broker (the embedded one)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from kombu import Connection
from sqlalchemy import select, update

from service.db import crud, training
from service.db.session import make_engine, make_sessionmaker
from service.db.tables import Job, TrainingJob, utcnow
from service.queue import (
    TRAIN_QUEUE,
    JobPublisher,
    embedded_broker_url,
    make_celery,
    prepare_embedded_broker,
)
from service.sweeper import sweep_once, sweep_training
from tests.utils.factories import make_job, make_key


def _queued_messages(broker_url: str, queue: str) -> list[str]:
    """Drain the queue; returns the job ids of the messages in it."""
    job_ids = []
    with Connection(broker_url) as connection:
        simple = connection.SimpleQueue(queue)
        while True:
            try:
                message = simple.get(block=False)
            except simple.Empty:
                break
            job_ids.append(message.payload[0][0])
            message.ack()
        simple.close()
    return job_ids


def test_sweeper_publishes_lost_and_expired_jobs(sqlite_url: str, tmp_path: Path) -> None:
    broker_path = tmp_path / "broker.sqlite"
    prepare_embedded_broker(broker_path)
    broker_url = embedded_broker_url(broker_path)
    publisher = JobPublisher(make_celery("test", broker_url))
    factory = make_sessionmaker(make_engine(sqlite_url))
    with factory() as session:
        tenant_id, _ = make_key(session)
        never = make_job(session, tenant_id)
        fresh = make_job(session, tenant_id)
        crud.mark_published(session, job_id=fresh.id)
        lost_worker = make_job(session, tenant_id)
        assert crud.claim_job(session, job_id=lost_worker.id, lease_s=60)
        gave_up = make_job(session, tenant_id)
        past = utcnow() - timedelta(seconds=60)
        session.execute(update(Job).where(Job.id == never.id).values(created_at=past))
        session.execute(
            update(Job)
            .where(Job.id.in_([lost_worker.id, gave_up.id]))
            .values(status="running", lease_expires_at=past)
        )
        session.execute(update(Job).where(Job.id == gave_up.id).values(attempts=3))
        session.commit()

        published = sweep_once(session, publisher, requeue_after_s=30, max_attempts=3)
        assert published == 2
        assert sorted(_queued_messages(broker_url, "interactive")) == sorted(
            [never.id, lost_worker.id]
        )
        session.expire_all()
        assert session.get(Job, lost_worker.id).status == "queued"  # type: ignore[union-attr]
        failed = session.get(Job, gave_up.id)
        assert failed is not None and failed.status == "failed" and "3 attempts" in failed.error
        # A second sweep right away publishes nothing: each job backs off.
        assert sweep_once(session, publisher, requeue_after_s=30, max_attempts=3) == 0
    publisher.close()


def test_sweeper_publishes_lost_training_jobs_and_fails_exhausted_ones(
    sqlite_url: str, tmp_path: Path
) -> None:
    broker_path = tmp_path / "broker.sqlite"
    prepare_embedded_broker(broker_path)
    broker_url = embedded_broker_url(broker_path)
    publisher = JobPublisher(make_celery("test", broker_url))
    factory = make_sessionmaker(make_engine(sqlite_url))
    past = utcnow() - timedelta(seconds=60)

    def training_job(session, tenant_id: int) -> TrainingJob:  # noqa: ANN001
        return training.create_training_job(
            session,
            tenant_id=tenant_id,
            name="m",
            arch="vae",
            dataset_file_id="file_x",
            config={},
            seed=0,
            parent_version=None,
            created_by="test",
            metadata={},
        )

    with factory() as session:
        tenant_id, _ = make_key(session)
        never, fresh, lost, spent = (training_job(session, tenant_id) for _ in range(4))
        session.commit()
        training.mark_training_published(session, job_id=fresh.id)
        assert training.claim_training_job(session, job_id=lost.id, lease_s=60)
        assert training.claim_training_job(session, job_id=spent.id, lease_s=60)
        session.execute(update(TrainingJob).values(created_at=past))
        session.execute(
            update(TrainingJob)
            .where(TrainingJob.id.in_([lost.id, spent.id]))
            .values(lease_expires_at=past)
        )
        session.execute(update(TrainingJob).where(TrainingJob.id == spent.id).values(attempts=3))
        session.commit()
        assert sweep_training(session, publisher, requeue_after_s=30, max_attempts=3) == 2
        statuses = {
            row.id: (row.status, row.error) for row in session.scalars(select(TrainingJob)).all()
        }
    assert sorted(_queued_messages(broker_url, TRAIN_QUEUE)) == sorted([never.id, lost.id])
    assert statuses[fresh.id] == ("queued", None) and statuses[lost.id][0] == "queued"
    assert statuses[spent.id][0] == "failed" and "3 attempts" in statuses[spent.id][1]
    publisher.close()
