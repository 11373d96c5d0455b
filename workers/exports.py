"""The worker's side of an export: run it (service/exports/run.py) and end its job.

The file and the job's end are one transaction: a redelivered or re-run export whose
earlier attempt died left nothing, and of two attempts that both finish only the one that
moves the job from running commits its file. Cancellation and the time limit are looked at
between pages; the file written so far is then rolled back.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy.orm import Session, sessionmaker

from service.api.schemas import ExportCreate
from service.db import crud
from service.db.tables import Job
from service.exports.run import ExportStopped, run_export
from workers.leases import LeaseKeeper

logger = logging.getLogger("genserve.worker")


def run_export_job(
    factory: sessionmaker[Session], job: Job, *, leases: LeaseKeeper, time_limit_s: float
) -> str:
    """Run a claimed export job to its end; returns its final status ("skipped" when another
    attempt ended it first)."""
    cancelled = leases.watch(job.id)
    deadline = time.monotonic() + time_limit_s
    try:
        with factory() as session:
            try:
                manifest = run_export(
                    session,
                    export_id=job.id,
                    tenant_id=job.tenant_id,
                    request=ExportCreate.model_validate(job.params),
                    embedding_model=job.model,
                    should_stop=lambda: cancelled.is_set() or time.monotonic() > deadline,
                )
            except ExportStopped:
                session.rollback()
                if cancelled.is_set():
                    status, error = "cancelled", None
                else:
                    status, error = (
                        "failed",
                        f"the export ran past its time limit of {time_limit_s:g} s",
                    )
                finished = crud.finish_job(session, job_id=job.id, status=status, error=error)
            else:
                status = "succeeded"
                finished = crud.finish_job(
                    session, job_id=job.id, status=status, result={"manifest": manifest}
                )
            if not finished:
                session.rollback()
                return "skipped"
            session.commit()
    finally:
        leases.release(job.id)
    logger.info("export %s %s", job.id, status)
    return status
