"""A batch's life on a real database and a real (embedded) broker, without a worker:
lines become jobs, a lost prepare resumes, cancel and expiry end it, finalize writes it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from service import batches
from service.db import crud
from service.db.session import make_engine, make_sessionmaker
from service.db.tables import Batch, Job, utcnow
from service.files import FileWriter, iter_lines
from service.queue import JobPublisher, make_celery, prepare_embedded_broker
from tests.utils.factories import finish, make_key

MODELS = batches.Models(chat=("tiny-random-llama",), embedding="all-minilm-l6-v2")
VALID = 30


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def publisher(tmp_path: Path) -> Iterator[JobPublisher]:
    broker = tmp_path / "broker.sqlite"
    prepare_embedded_broker(broker)
    publisher = JobPublisher(make_celery("test", f"gsqla+sqlite:///{broker}"))
    yield publisher
    publisher.close()


def request_line(i: int) -> dict:
    body = {"model": "tiny-random-llama", "messages": [{"role": "user", "content": f"q{i}"}]}
    return {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def new_batch(sessions: sessionmaker[Session]) -> str:
    """A batch over VALID good lines, one of another endpoint and one that is not JSON."""
    lines = [json.dumps(request_line(i)) for i in range(VALID)]
    lines.insert(5, json.dumps({**request_line(99), "url": "/v1/completions"}))
    lines.append("")
    lines.append("nope")
    with sessions() as session:
        tenant_id, _ = make_key(session)
        writer = FileWriter(
            session=session,
            tenant_id=tenant_id,
            purpose="batch",
            filename="in.jsonl",
            max_bytes=None,
            max_lines=None,
            chunk_bytes=256,  # lines cross chunk boundaries
        )
        writer.write("\n".join(lines).encode())
        file = writer.close()
        batch = batches.create_batch(
            session,
            tenant_id=tenant_id,
            endpoint="/v1/chat/completions",
            input_file_id=file.id,
            completion_window="24h",
            metadata={},
        )
        session.commit()
        return batch.id


def lines_of(session: Session, batch_id: str) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.batch_id == batch_id).order_by(Job.id)))


def test_prepare_turns_lines_into_jobs_and_resumes(
    sessions: sessionmaker[Session], publisher: JobPublisher
) -> None:
    batch_id = new_batch(sessions)
    assert batches.prepare_batch(sessions, publisher, batch_id, models=MODELS, lease_s=60) == (
        "prepared"
    )
    with sessions() as session:
        jobs = lines_of(session, batch_id)
        assert len(jobs) == VALID + 2
        queued = [job for job in jobs if job.status == "queued"]
        assert len(queued) == VALID and all(job.published_at for job in queued)
        assert {job.queue for job in queued} == {"batch"}
        failed = [job for job in jobs if job.status == "failed"]
        assert {job.result["error"]["code"] for job in failed} == {"invalid_url", "invalid_json"}
        # What a prepare lost halfway leaves: the first lines stored, the batch validating.
        session.execute(delete(Job).where(Job.id.in_([job.id for job in jobs[12:]])))
        session.execute(
            Batch.__table__.update()
            .where(Batch.id == batch_id)
            .values(status="validating", lease_expires_at=None)
        )
        session.commit()
    batches.prepare_batch(sessions, publisher, batch_id, models=MODELS, lease_s=60)
    with sessions() as session:
        jobs = lines_of(session, batch_id)
        custom_ids = [job.custom_id for job in jobs if job.custom_id]
        assert len(jobs) == VALID + 2 and len(custom_ids) == len(set(custom_ids))
        batch = session.get(Batch, batch_id)
        assert batch is not None and (batch.status, batch.total) == ("in_progress", VALID + 2)


def test_cancel_then_finalize_writes_both_files(
    sessions: sessionmaker[Session], publisher: JobPublisher
) -> None:
    batch_id = new_batch(sessions)
    batches.prepare_batch(sessions, publisher, batch_id, models=MODELS, lease_s=60)
    with sessions() as session:
        done = [job for job in lines_of(session, batch_id) if job.status == "queued"][:10]
    for job in done:
        finish(sessions, job, "answer")
    with sessions() as session:
        batch = batches.get_batch(session, tenant_id=done[0].tenant_id, batch_id=batch_id)
        assert batch is not None
        batches.cancel_batch(session, publisher, batch=batch)
        assert batch.status == "finalizing"  # nothing was running
        counts = batches.request_counts(session, batch=batch)
        assert (counts.total, counts.completed, counts.failed) == (VALID + 2, 10, VALID - 10 + 2)
    assert batches.finalize_batch(sessions, batch_id, lease_s=60) == "cancelled"
    with sessions() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None and batch.output_file_id and batch.error_file_id
        outputs = [json.loads(raw) for raw in iter_lines(session, batch.output_file_id)]
        errors = [json.loads(raw) for raw in iter_lines(session, batch.error_file_id)]
    assert {line["custom_id"] for line in outputs} == {job.custom_id for job in done}
    assert all(
        line["response"]["body"]["choices"][0]["message"]["content"] == "answer" for line in outputs
    )
    assert len(errors) == VALID - 10 + 2
    cancelled = [line for line in errors if line["response"]]
    assert {line["response"]["status_code"] for line in cancelled} == {409}
    # Finalizing twice writes nothing twice.
    assert batches.finalize_batch(sessions, batch_id, lease_s=60) == "skipped"


def test_a_batch_past_its_window_expires(
    sessions: sessionmaker[Session], publisher: JobPublisher
) -> None:
    batch_id = new_batch(sessions)
    batches.prepare_batch(sessions, publisher, batch_id, models=MODELS, lease_s=60)
    with sessions() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None
        batch.expires_at = utcnow() - timedelta(seconds=1)
        session.commit()
        batches.sweep_batches(session, publisher, now=utcnow(), grace_s=5)
        session.refresh(batch)
        assert batch.status == "finalizing" and batch.expired_at is not None
        assert crud.count_batch_jobs(session, batch_id=batch_id) == VALID + 2
    assert batches.finalize_batch(sessions, batch_id, lease_s=60) == "expired"
