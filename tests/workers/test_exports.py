"""The export job in-process on both backends: one file however many attempts ran, none
from an attempt that died, was cancelled or ran out of time."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.api.schemas import ExportCreate
from service.db import crud, exports
from service.db.session import make_engine, make_sessionmaker
from service.db.tables import File, Job, utcnow
from service.exports.run import run_export
from tests.utils.factories import make_key, store_turn
from workers.exports import run_export_job
from workers.leases import LeaseKeeper

EMBEDDER = "all-minilm-l6-v2"


def _history(factory: sessionmaker[Session]) -> tuple[int, Job]:
    """A tenant with three generations, and a queued export of them."""
    rng = np.random.default_rng(3)
    with factory() as session:
        tenant_id, _ = make_key(session)
        for n in range(3):
            vector = rng.standard_normal(8).astype(np.float32).tobytes()
            store_turn(
                session,
                tenant_id,
                turn_input={"prompt": f"question {n}"},
                output=f"answer {n}",
                vectors={"prompt": vector, "output": vector},
            )
        job = exports.create_export(
            session,
            tenant_id=tenant_id,
            api_key_id=None,
            embedding_model=EMBEDDER,
            params=ExportCreate().job_params(),
            metadata={},
        )
        session.commit()
        return tenant_id, job


def _claim(factory: sessionmaker[Session], job_id: str) -> Job:
    with factory() as session:
        claimed = crud.claim_job(session, job_id=job_id, lease_s=60)
        assert claimed is not None
        return claimed


def _files(factory: sessionmaker[Session]) -> int:
    with factory() as session:
        return session.scalar(select(func.count()).select_from(File)) or 0


def test_a_dead_attempt_leaves_nothing_and_two_attempts_leave_one_file(db_url: str) -> None:
    factory = make_sessionmaker(make_engine(db_url))
    leases = LeaseKeeper(factory, lease_s=60)
    tenant_id, job = _history(factory)
    first = _claim(factory, job.id)
    with factory() as session:  # the worker dies before its commit
        run_export(
            session,
            export_id=job.id,
            tenant_id=tenant_id,
            request=ExportCreate(),
            embedding_model=EMBEDDER,
        )
    assert _files(factory) == 0
    with factory() as session:  # its lease runs out; the job is delivered again
        session.execute(
            update(Job).where(Job.id == job.id).values(lease_expires_at=utcnow() - timedelta(1))
        )
        session.commit()
    second = _claim(factory, job.id)
    assert run_export_job(factory, second, leases=leases, time_limit_s=60) == "succeeded"
    # The first attempt was only slow: it finishes too, and its file is rolled back.
    assert run_export_job(factory, first, leases=leases, time_limit_s=60) == "skipped"
    assert _files(factory) == 1
    with factory() as session:
        ended = session.get(Job, job.id)
        assert ended is not None and ended.status == "succeeded" and ended.attempts == 2
        manifest = ended.result["manifest"] if ended.result else {}
        assert manifest["counts"]["written"] == 3
        assert session.get(File, manifest["file_id"]) is not None


def test_cancelled_or_timed_out_exports_write_no_file(db_url: str) -> None:
    factory = make_sessionmaker(make_engine(db_url))
    leases = LeaseKeeper(factory, lease_s=60, every_s=3600)
    _, job = _history(factory)
    claimed = _claim(factory, job.id)
    with factory() as session:
        row = session.get(Job, job.id)
        assert row is not None
        crud.cancel_job(session, job=row)
        session.commit()
    leases.watch(job.id)
    leases.renew()  # brings the cancellation to the job's event
    assert run_export_job(factory, claimed, leases=leases, time_limit_s=60) == "cancelled"

    _, late = _history(factory)
    claimed = _claim(factory, late.id)
    assert run_export_job(factory, claimed, leases=leases, time_limit_s=0) == "failed"
    with factory() as session:
        failed = session.get(Job, late.id)
        assert failed is not None and "time limit of 0 s" in (failed.error or "")
    assert _files(factory) == 0
