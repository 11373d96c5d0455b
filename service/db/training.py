"""Training jobs, their progress, and the model versions they register."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from service.db.crud import claim, page_by_id
from service.db.tables import ModelVersion, TrainingEvent, TrainingJob, new_id, utcnow

# --- training jobs -----------------------------------------------------------------------


def create_training_job(
    session: Session,
    *,
    tenant_id: int,
    name: str,
    arch: str,
    dataset_file_id: str,
    config: dict[str, Any],
    seed: int,
    parent_version: int | None,
    created_by: str,
    metadata: dict[str, Any],
) -> TrainingJob:
    job = TrainingJob(
        id=new_id("train"),
        tenant_id=tenant_id,
        name=name,
        arch=arch,
        dataset_file_id=dataset_file_id,
        config=config,
        seed=seed,
        parent_version=parent_version,
        created_by=created_by,
        status="queued",
        progress={},
        meta=metadata,
        attempts=0,
        publish_count=0,
        cancel_requested=False,
    )
    session.add(job)
    session.flush()
    return job


def get_training_job(session: Session, *, tenant_id: int, job_id: str) -> TrainingJob | None:
    return session.scalar(
        select(TrainingJob).where(TrainingJob.id == job_id, TrainingJob.tenant_id == tenant_id)
    )


def list_training_jobs(
    session: Session, *, tenant_id: int, status: str | None, cursor: str | None, limit: int
) -> tuple[list[TrainingJob], bool]:
    query = select(TrainingJob).where(TrainingJob.tenant_id == tenant_id)
    if status:
        query = query.where(TrainingJob.status == status)
    return page_by_id(session, query, TrainingJob, after=cursor, limit=limit)


def mark_training_published(session: Session, *, job_id: str) -> None:
    session.execute(
        update(TrainingJob)
        .where(TrainingJob.id == job_id)
        .values(published_at=utcnow(), publish_count=TrainingJob.publish_count + 1)
    )


def cancel_training_job(session: Session, *, job: TrainingJob) -> TrainingJob:
    """A queued job is cancelled at once; a running one stops at its next step."""
    now = utcnow()
    session.execute(
        update(TrainingJob)
        .where(TrainingJob.id == job.id, TrainingJob.status == "queued")
        .values(status="cancelled", finished_at=now, cancel_requested=True)
    )
    session.execute(
        update(TrainingJob)
        .where(TrainingJob.id == job.id, TrainingJob.status == "running")
        .values(cancel_requested=True)
    )
    session.flush()
    session.refresh(job)
    return job


def training_events(
    session: Session, *, job_id: str, after_id: int = 0, limit: int = 1000
) -> list[TrainingEvent]:
    return list(
        session.scalars(
            select(TrainingEvent)
            .where(TrainingEvent.training_job_id == job_id, TrainingEvent.id > after_id)
            .order_by(TrainingEvent.id)
            .limit(limit)
        )
    )


# --- the worker's side -------------------------------------------------------------------


def claim_training_job(session: Session, *, job_id: str, lease_s: float) -> TrainingJob | None:
    """Mark the job running if it is queued or its lease expired (one delivery wins)."""
    return claim(session, TrainingJob, job_id=job_id, lease_s=lease_s)


def record_training_event(
    session: Session,
    *,
    job_id: str,
    attempt: int,
    kind: str,
    data: dict[str, Any],
    lease_s: float,
) -> bool:
    """Store one report, keep it as the job's progress, renew the lease.

    Returns whether the job was asked to stop (cancelled, or no longer this attempt's).
    """
    values: dict[str, Any] = {"lease_expires_at": utcnow() + timedelta(seconds=lease_s)}
    if kind == "progress":
        values["progress"] = data
    updated = session.execute(
        update(TrainingJob)
        .where(
            TrainingJob.id == job_id,
            TrainingJob.status == "running",
            TrainingJob.attempts == attempt,
        )
        .values(**values)
    )
    session.add(TrainingEvent(training_job_id=job_id, attempt=attempt, kind=kind, data=data))
    session.commit()
    if updated.rowcount != 1:  # type: ignore[attr-defined]
        return True
    return bool(
        session.scalar(select(TrainingJob.cancel_requested).where(TrainingJob.id == job_id))
    )


def finish_training_job(
    session: Session,
    *,
    job_id: str,
    attempt: int,
    status: str,
    error: str | None = None,
    model_version: int | None = None,
) -> bool:
    """Move this attempt's running job to a final status; False when it is not ours."""
    updated = session.execute(
        update(TrainingJob)
        .where(
            TrainingJob.id == job_id,
            TrainingJob.status == "running",
            TrainingJob.attempts == attempt,
        )
        .values(
            status=status,
            error=error,
            model_version=model_version,
            finished_at=utcnow(),
            lease_expires_at=None,
        )
    )
    return updated.rowcount == 1  # type: ignore[attr-defined]


# --- the sweeper's side ------------------------------------------------------------------


def stale_training_jobs(
    session: Session, *, now: datetime, requeue_after_s: float, limit: int = 100
) -> list[TrainingJob]:
    """Queued jobs not published for a while, and running jobs whose worker is gone."""
    before = now - timedelta(seconds=requeue_after_s)
    query = (
        select(TrainingJob)
        .where(
            or_(
                and_(
                    TrainingJob.status == "queued",
                    or_(TrainingJob.published_at.is_(None), TrainingJob.published_at < before),
                    TrainingJob.created_at < before,
                ),
                and_(TrainingJob.status == "running", TrainingJob.lease_expires_at < now),
            )
        )
        .order_by(TrainingJob.id)
        .limit(limit)
    )
    return list(session.scalars(query))


# --- model versions ----------------------------------------------------------------------


def _visible(tenant_id: int) -> Any:
    return or_(ModelVersion.tenant_id == tenant_id, ModelVersion.tenant_id.is_(None))


def next_version(session: Session, *, tenant_id: int | None, name: str) -> int:
    owner = (
        ModelVersion.tenant_id.is_(None)
        if tenant_id is None
        else (ModelVersion.tenant_id == tenant_id)
    )
    latest = session.scalar(
        select(func.max(ModelVersion.version)).where(owner, ModelVersion.name == name)
    )
    return (latest or 0) + 1


def register_version(session: Session, *, tenant_id: int | None, **fields: Any) -> ModelVersion:
    """Add the next version of a name (flushed, not committed)."""
    row = ModelVersion(
        tenant_id=tenant_id,
        version=next_version(session, tenant_id=tenant_id, name=fields["name"]),
        **fields,
    )
    session.add(row)
    session.flush()
    return row


def list_versions(
    session: Session, *, tenant_id: int, name: str | None = None
) -> list[ModelVersion]:
    """The versions the tenant can use (its own and the built-in ones), by name and version."""
    query = select(ModelVersion).where(_visible(tenant_id))
    if name is not None:
        query = query.where(ModelVersion.name == name)
    return list(session.scalars(query.order_by(ModelVersion.name, ModelVersion.version)))


def served_version(versions: list[ModelVersion]) -> ModelVersion | None:
    """Of one name's versions: the one promoted last, else the newest."""
    promoted = [v for v in versions if v.promoted_at is not None]
    if promoted:
        return max(promoted, key=lambda v: (v.promoted_at, v.version))
    return max(versions, key=lambda v: v.version, default=None)


def get_version(
    session: Session, *, tenant_id: int, name: str, version: int | None = None
) -> ModelVersion | None:
    """One version of a name, or the served one when version is None.

    A tenant's own name shadows a built-in one of the same name.
    """
    versions = list_versions(session, tenant_id=tenant_id, name=name)
    own = [v for v in versions if v.tenant_id is not None]
    versions = own or versions
    if version is None:
        return served_version(versions)
    return next((v for v in versions if v.version == version), None)


def promote_version(session: Session, *, row: ModelVersion) -> ModelVersion:
    row.promoted_at = utcnow()
    session.flush()
    return row


def get_builtin(session: Session, *, name: str, artifact_sha256: str) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion).where(
            ModelVersion.tenant_id.is_(None),
            ModelVersion.name == name,
            ModelVersion.artifact_sha256 == artifact_sha256,
        )
    )
