"""Exports: the history's prompt-response pairs as a JSONL file for supervised training."""

from __future__ import annotations

from fastapi import APIRouter, Response, status
from sqlalchemy.orm import Session

from service.api.deps import (
    CallerDep,
    EmbeddingModelDep,
    LimitsDep,
    PublisherDep,
    SessionDep,
    WriterDep,
    audit,
)
from service.api.errors import ERROR_RESPONSES, NotFound
from service.api.routes.jobs import cancel_unfinished
from service.api.routes.listing import Cursor, Limit
from service.api.schemas import ExportCreate, ExportPublic, Page
from service.db import exports
from service.db.tables import Job
from service.submit import admit, publish_job

PREFIX = "/v1/exports"
router = APIRouter(prefix=PREFIX, tags=["exports"], responses=ERROR_RESPONSES)


def _export(session: Session, tenant_id: int, export_id: str) -> Job:
    found = exports.get_export(session, tenant_id=tenant_id, export_id=export_id)
    if found is None:
        raise NotFound(f"export {export_id!r} not found", param="export_id")
    return found


@router.post("", response_model=ExportPublic, status_code=status.HTTP_202_ACCEPTED)
def create_export(
    body: ExportCreate,
    caller: WriterDep,
    session: SessionDep,
    publisher: PublisherDep,
    limits: LimitsDep,
    embedding_model: EmbeddingModelDep,
    response: Response,
) -> ExportPublic:
    """Export generations as JSONL (OpenAI chat fine-tuning, or prompt/completion),
    filtered and without duplicates; a job on the batch queue writes the file."""
    admit(session, tenant_id=caller.tenant_id, max_queued=limits.max_queued_jobs_per_tenant)
    job = exports.create_export(
        session,
        tenant_id=caller.tenant_id,
        api_key_id=caller.key_id,
        embedding_model=embedding_model,
        params=body.job_params(),
        metadata=body.metadata,
    )
    audit(session, caller, "export.create", job.id)
    session.commit()
    publish_job(session, publisher, job)
    response.headers["Location"] = f"{PREFIX}/{job.id}"
    return ExportPublic.from_row(job)


@router.get("", response_model=Page[ExportPublic])
def read_exports(
    caller: CallerDep, session: SessionDep, cursor: Cursor = None, limit: Limit = 20
) -> Page[ExportPublic]:
    """The caller's exports, newest first."""
    rows, has_more = exports.list_exports(
        session, tenant_id=caller.tenant_id, after=cursor, limit=limit
    )
    return Page[ExportPublic].of(rows, has_more, ExportPublic.from_row)


@router.get("/{export_id}", response_model=ExportPublic)
def read_export(export_id: str, caller: CallerDep, session: SessionDep) -> ExportPublic:
    """An export: its status, and once done its manifest and output_file_id."""
    return ExportPublic.from_row(_export(session, caller.tenant_id, export_id))


@router.post("/{export_id}/cancel", response_model=ExportPublic)
def cancel_export(export_id: str, caller: WriterDep, session: SessionDep) -> ExportPublic:
    """Cancel a queued export, or stop a running one before its next page; it writes
    no file."""
    job = _export(session, caller.tenant_id, export_id)
    return ExportPublic.from_row(cancel_unfinished(session, job, name="export", param="export_id"))
