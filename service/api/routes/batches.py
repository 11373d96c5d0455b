"""OpenAI's Batch API: a file of requests run as low-priority jobs (service/batches.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy.orm import Session

from service import batches
from service.api.deps import CallerDep, LimitsDep, PublisherDep, SessionDep, WriterDep
from service.api.errors import ERROR_RESPONSES, InvalidRequest, NotFound
from service.db.tables import Batch
from service.files import get_file
from service.openai_compat.protocol import (
    BatchCreate,
    BatchError,
    BatchErrors,
    BatchObject,
    BatchRequestCounts,
    CursorList,
)
from service.openai_compat.responses import unix
from service.queue import PREPARE_BATCH_TASK
from service.submit import admit

router = APIRouter(prefix="/v1/batches", tags=["batches"], responses=ERROR_RESPONSES)

_MOMENTS = (
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def batch_object(session: Session, batch: Batch) -> BatchObject:
    counts = batches.request_counts(session, batch=batch)
    moments: dict[str, Any] = {
        name: unix(getattr(batch, name)) if getattr(batch, name) else None for name in _MOMENTS
    }
    return BatchObject(
        id=batch.id,
        endpoint=batch.endpoint,
        errors=BatchErrors(data=[BatchError(**e) for e in batch.errors]) if batch.errors else None,
        input_file_id=batch.input_file_id,
        completion_window=batch.completion_window,
        status=batch.status,
        output_file_id=batch.output_file_id,
        error_file_id=batch.error_file_id,
        created_at=unix(batch.created_at),
        request_counts=BatchRequestCounts(
            total=counts.total, completed=counts.completed, failed=counts.failed
        ),
        metadata=batch.meta or None,
        **moments,
    )


def _get_batch(session: Session, tenant_id: int, batch_id: str) -> Batch:
    batch = batches.get_batch(session, tenant_id=tenant_id, batch_id=batch_id)
    if batch is None:
        raise NotFound(f"batch {batch_id!r} not found", param="batch_id")
    return batch


@router.post("", response_model=BatchObject)
def create_batch(
    body: BatchCreate,
    caller: WriterDep,
    session: SessionDep,
    publisher: PublisherDep,
    limits: LimitsDep,
) -> BatchObject:
    """Run every line of an uploaded JSONL file (purpose "batch") against one endpoint.

    A batch is admitted while the tenant is within its quotas of the day; its lines
    then count against them as they are stored, and none is refused for it.
    """
    admit(session, tenant_id=caller.tenant_id, max_queued=limits.max_queued_jobs_per_tenant)
    file = get_file(session, tenant_id=caller.tenant_id, file_id=body.input_file_id)
    if file is None:
        raise NotFound(f"file {body.input_file_id!r} not found", param="input_file_id")
    if file.purpose != "batch":
        raise InvalidRequest(
            f"file {file.id!r} has purpose {file.purpose!r}; a batch reads a 'batch' file",
            param="input_file_id",
        )
    batch = batches.create_batch(
        session,
        tenant_id=caller.tenant_id,
        endpoint=body.endpoint,
        input_file_id=file.id,
        completion_window=body.completion_window,
        metadata=dict(body.metadata or {}),
    )
    session.commit()
    # Rule 2: stored first; if this publish is lost, the sweeper sends it again.
    publisher.send(PREPARE_BATCH_TASK, batch.id, queue=batches.BATCH_QUEUE)
    return batch_object(session, batch)


@router.get("/{batch_id}", response_model=BatchObject)
def read_batch(batch_id: str, caller: CallerDep, session: SessionDep) -> BatchObject:
    """A batch, with its request counts as of now."""
    return batch_object(session, _get_batch(session, caller.tenant_id, batch_id))


@router.get("", response_model=CursorList)
def read_batches(
    caller: CallerDep,
    session: SessionDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> CursorList:
    """The caller's batches, newest first."""
    rows, has_more = batches.list_batches(
        session, tenant_id=caller.tenant_id, after=after, limit=limit
    )
    data = [batch_object(session, row) for row in rows]
    return CursorList.of(data, has_more)


@router.post("/{batch_id}/cancel", response_model=BatchObject)
def cancel_batch(
    batch_id: str, caller: WriterDep, session: SessionDep, publisher: PublisherDep
) -> BatchObject:
    """Cancel a batch: queued lines stop; what finished still goes to the output file."""
    batch = _get_batch(session, caller.tenant_id, batch_id)
    batches.cancel_batch(session, publisher, batch=batch)
    return batch_object(session, batch)
