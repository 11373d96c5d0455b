"""Training jobs: train a family on an uploaded dataset, follow it, cancel it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session, sessionmaker

from models.registry import REGISTRY, TRAINED_FAMILIES
from service import files
from service.api.deps import CallerDep, PublisherDep, SessionDep, SessionmakerDep, WriterDep
from service.api.errors import ERROR_RESPONSES, Conflict, InvalidRequest, NotFound
from service.api.routes.listing import Cursor, Limit
from service.api.schemas import (
    Page,
    TrainingEventList,
    TrainingEventPublic,
    TrainingJobCreate,
    TrainingJobPublic,
)
from service.db import training
from service.db.tables import TrainingEvent, TrainingJob
from service.openai_compat.responses import sse_event
from service.openai_compat.serving import event_stream
from service.queue import TRAIN_MODEL_TASK, TRAIN_QUEUE, JobPublisher

router = APIRouter(prefix="/v1/training-jobs", tags=["training"], responses=ERROR_RESPONSES)

# Dataset formats by the family's data kind (models.registry.TRAINED_FAMILIES).
DATASET_SUFFIXES = {"text": None, "images": (".npz", ".zip"), "table": (".csv",)}
EVENTS_POLL_S = 0.5
EVENTS_PAGE = 1000


def _check_dataset(session: Session, tenant_id: int, job_in: TrainingJobCreate) -> None:
    dataset = files.get_file(session, tenant_id=tenant_id, file_id=job_in.dataset_file_id)
    if dataset is None:
        raise NotFound(f"file {job_in.dataset_file_id!r} not found", param="dataset_file_id")
    if dataset.kind != "real":
        raise InvalidRequest(
            f"file {dataset.id!r} is {dataset.kind} data; models train on uploaded data only",
            param="dataset_file_id",
            code="synthetic_dataset",
        )
    data_kind, _ = TRAINED_FAMILIES[job_in.arch]
    suffixes = DATASET_SUFFIXES[data_kind]
    if suffixes and not dataset.filename.lower().endswith(suffixes):
        raise InvalidRequest(
            f"{job_in.arch} trains on {data_kind} given as {' or '.join(suffixes)}; "
            f"file {dataset.id!r} is {dataset.filename!r}",
            param="dataset_file_id",
            code="invalid_dataset",
        )


def _check_name(session: Session, tenant_id: int, job_in: TrainingJobCreate) -> None:
    if job_in.name in REGISTRY:
        raise Conflict(
            f"{job_in.name!r} is the name of a served language model; choose another",
            param="name",
            code="model_name_taken",
        )
    versions = training.list_versions(session, tenant_id=tenant_id, name=job_in.name)
    other = next((v for v in versions if v.family != job_in.arch), None)
    if other is not None:
        raise Conflict(
            f"model {job_in.name!r} is a {other.family} model; a {job_in.arch} needs another name",
            param="name",
            code="model_name_taken",
        )
    if job_in.parent_version is not None and not any(
        v.version == job_in.parent_version and v.tenant_id == tenant_id for v in versions
    ):
        raise NotFound(
            f"model {job_in.name}:{job_in.parent_version} not found", param="parent_version"
        )


def publish_training(session: Session, publisher: JobPublisher, job: TrainingJob) -> None:
    """Rule 2: publish after the commit; a failed publish leaves the job to the sweeper."""
    if publisher.send(TRAIN_MODEL_TASK, job.id, queue=TRAIN_QUEUE):
        training.mark_training_published(session, job_id=job.id)
        session.commit()


@router.post("", response_model=TrainingJobPublic, status_code=status.HTTP_202_ACCEPTED)
def create_training_job(
    job_in: TrainingJobCreate,
    caller: WriterDep,
    session: SessionDep,
    publisher: PublisherDep,
    response: Response,
) -> TrainingJobPublic:
    """Train a model on an uploaded dataset; success registers its next version."""
    _check_dataset(session, caller.tenant_id, job_in)
    _check_name(session, caller.tenant_id, job_in)
    job = training.create_training_job(
        session,
        tenant_id=caller.tenant_id,
        name=job_in.name,
        arch=job_in.arch,
        dataset_file_id=job_in.dataset_file_id,
        config=job_in.config,
        seed=job_in.seed,
        parent_version=job_in.parent_version,
        created_by=f"key:{caller.key_id}",
        metadata=job_in.metadata,
    )
    session.commit()
    publish_training(session, publisher, job)
    response.headers["Location"] = f"/v1/training-jobs/{job.id}"
    return TrainingJobPublic.from_row(job)


def _get(session: Session, tenant_id: int, job_id: str) -> TrainingJob:
    job = training.get_training_job(session, tenant_id=tenant_id, job_id=job_id)
    if job is None:
        raise NotFound(f"training job {job_id!r} not found", param="job_id")
    return job


@router.get("", response_model=Page[TrainingJobPublic])
def read_training_jobs(
    caller: CallerDep,
    session: SessionDep,
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
    cursor: Cursor = None,
    limit: Limit = 20,
) -> Page[TrainingJobPublic]:
    """The caller's training jobs, newest first."""
    rows, has_more = training.list_training_jobs(
        session, tenant_id=caller.tenant_id, status=status, cursor=cursor, limit=limit
    )
    return Page[TrainingJobPublic].of(rows, has_more, TrainingJobPublic.from_row)


@router.get("/{job_id}", response_model=TrainingJobPublic)
def read_training_job(job_id: str, caller: CallerDep, session: SessionDep) -> TrainingJobPublic:
    """A training job, its status and its latest progress."""
    return TrainingJobPublic.from_row(_get(session, caller.tenant_id, job_id))


@router.post("/{job_id}/cancel", response_model=TrainingJobPublic)
def cancel_training_job(job_id: str, caller: WriterDep, session: SessionDep) -> TrainingJobPublic:
    """Cancel a queued job, or stop a running one at its next step; nothing is registered."""
    job = _get(session, caller.tenant_id, job_id)
    if job.status in ("succeeded", "failed"):
        raise Conflict(
            f"training job {job_id!r} has already {job.status}", param="job_id", code="job_finished"
        )
    job = training.cancel_training_job(session, job=job)
    session.commit()
    return TrainingJobPublic.from_row(job)


def _event(row: TrainingEvent) -> TrainingEventPublic:
    return TrainingEventPublic.model_validate(row, from_attributes=True)


@router.get("/{job_id}/progress", response_model=TrainingEventList)
def read_training_progress(
    job_id: str, caller: CallerDep, session: SessionDep, after: int = 0
) -> TrainingEventList:
    """Every report of the job so far (its loss curve), oldest first."""
    job = _get(session, caller.tenant_id, job_id)
    rows = training.training_events(session, job_id=job.id, after_id=after, limit=10_000)
    return TrainingEventList(data=[_event(row) for row in rows])


async def _follow(
    http: Request, factory: sessionmaker[Session], tenant_id: int, job_id: str
) -> AsyncIterator[bytes]:
    """Each stored report as an event, then `end` with the job once it is over."""
    last = 0
    while True:
        rows, job = await asyncio.to_thread(_poll, factory, tenant_id, job_id, last)
        for row in rows:
            last = row.id
            yield sse_event(row.kind, _event(row).model_dump(mode="json"))
        if len(rows) == EVENTS_PAGE:
            continue
        if job is None or job.status in ("succeeded", "failed", "cancelled"):
            if job is not None:
                yield sse_event("end", TrainingJobPublic.from_row(job).model_dump(mode="json"))
            return
        if await http.is_disconnected():
            return
        await asyncio.sleep(EVENTS_POLL_S)


def _poll(
    factory: sessionmaker[Session], tenant_id: int, job_id: str, after: int
) -> tuple[list[TrainingEvent], TrainingJob | None]:
    with factory() as session:
        # The job first: a report made after this read is picked up by the next poll.
        job = training.get_training_job(session, tenant_id=tenant_id, job_id=job_id)
        rows = training.training_events(session, job_id=job_id, after_id=after, limit=EVENTS_PAGE)
        session.expunge_all()
        return list(rows), job


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
def read_training_events(
    job_id: str, http: Request, caller: CallerDep, session: SessionDep, factory: SessionmakerDep
) -> StreamingResponse:
    """The job's progress as Server-Sent Events: `progress` and `status` reports, then `end`."""
    job = _get(session, caller.tenant_id, job_id)
    session.close()
    return event_stream(_follow(http, factory, caller.tenant_id, job.id))
