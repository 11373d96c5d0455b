"""Generation jobs: submit, read, list, cancel."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from models.registry import REGISTRY
from service import trained
from service.api.deps import (
    Caller,
    CallerDep,
    EventsDep,
    LimitsDep,
    PublisherDep,
    ResponseCacheDep,
    ServedModelsDep,
    SessionDep,
    SessionmakerDep,
    WriterDep,
)
from service.api.errors import ERROR_RESPONSES, Conflict, InvalidRequest, NotFound
from service.api.routes.collections import RetrieverDep
from service.api.routes.listing import Cursor, Limit, list_filters
from service.api.schemas import JobCreate, JobPublic, Page
from service.cache import CacheHit, CachePolicy, ResponseCache, keys_for
from service.db import crud
from service.db.tables import Job
from service.events import EventSource
from service.follow import Delta, Finished, Restarted, follow_job, load_job
from service.openai_compat.responses import sse_event
from service.openai_compat.serving import event_stream, interrupted
from service.submit import (
    JobRequest,
    admit,
    publish_job,
    resolve_max_tokens,
    served_model,
    store_job,
)

# Jobs one listing may name by id (GET /v1/jobs?id=...&id=...).
MAX_IDS = 100

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERROR_RESPONSES)


def _chat_params(job_in: JobCreate, served: tuple[str, ...]) -> dict[str, object]:
    """The sampling params with the model's defaults filled in, checked against its limits."""
    spec = served_model(job_in.model, served, task="chat")
    kind = job_in.input.kind
    if kind not in ("prompt", "messages"):
        raise InvalidRequest(
            f"model {spec.name!r} is a language model; it takes input.prompt or input.messages",
            param=f"input.{kind}",
            code="unsupported_input",
        )
    params = job_in.params.model_dump()
    if params.pop("top_k") is not None:
        raise InvalidRequest("top_k applies to character-level RNN models", param="params.top_k")
    params["max_tokens"] = resolve_max_tokens(spec, params["max_tokens"], param="params.max_tokens")
    return params


def _resolve(
    session: Session, tenant_id: int, job_in: JobCreate, served: tuple[str, ...]
) -> tuple[str, dict[str, object]]:
    """(the model as stored, the job's params): a language model or a trained version."""
    if job_in.model in REGISTRY:
        return job_in.model, _chat_params(job_in, served)
    row = trained.resolve_version(session, tenant_id=tenant_id, model=job_in.model)
    if row is None:
        raise NotFound(
            f"model {job_in.model!r} is not served here; language models: {list(served)}, "
            "trained models: GET /v1/models",
            param="model",
            code="model_not_found",
        )
    return row.name, trained.trained_job_params(
        session, tenant_id=tenant_id, job_in=job_in, row=row
    )


def _thread(session: Session, tenant_id: int, job_in: JobCreate) -> tuple[str | None, str | None]:
    """(conversation id, parent generation id) of the new turn, checked for the tenant."""
    if job_in.parent_generation_id:
        parent = crud.get_generation(
            session, tenant_id=tenant_id, generation_id=job_in.parent_generation_id
        )
        if parent is None:
            raise NotFound(
                f"generation {job_in.parent_generation_id!r} not found",
                param="parent_generation_id",
            )
        return parent.conversation_id, parent.id
    if job_in.conversation_id:
        conversation = crud.get_conversation(
            session, tenant_id=tenant_id, conversation_id=job_in.conversation_id
        )
        if conversation is None:
            raise NotFound(
                f"conversation {job_in.conversation_id!r} not found", param="conversation_id"
            )
        latest = crud.latest_generation(session, conversation_id=conversation.id)
        return conversation.id, latest.id if latest else None
    return None, None


def _question(job_in: JobCreate) -> str:
    """What a grounded job retrieves for: its prompt, or its last message."""
    if job_in.model not in REGISTRY:
        raise InvalidRequest(
            "rag grounds language models; trained models take no passages",
            param="rag",
            code="unsupported_input",
        )
    if job_in.input.raw:
        raise InvalidRequest(
            "rag puts passages into a chat turn; a raw prompt has none",
            param="input.raw",
            code="unsupported_input",
        )
    return job_in.input.text()


def _request_hash(job_in: JobCreate) -> str:
    return hashlib.sha256(job_in.model_dump_json().encode()).hexdigest()


def _replay(session: Session, tenant_id: int, key: str, request_hash: str) -> Job | None:
    job = crud.get_job_by_idempotency_key(session, tenant_id=tenant_id, key=key)
    if job is not None and job.request_hash != request_hash:
        raise Conflict(
            "this Idempotency-Key was used with a different request body",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return job


def _cached(
    session: Session,
    cache: ResponseCache,
    caller: Caller,
    job_in: JobCreate,
    model: str,
    params: dict[str, object],
    conversation_id: str | None,
) -> CacheHit | None:
    """The stored generation that answers this request, counted as a cache hit; or None."""
    assert job_in.cache is not None
    keys = keys_for(
        tenant_id=caller.tenant_id,
        api="jobs",
        model=model,
        input=job_in.input.model_dump(exclude_none=True),
        params=params,
        threaded=conversation_id is not None,
        grounded=job_in.rag is not None,
    )
    hit = cache.answer(
        session,
        tenant_id=caller.tenant_id,
        api_key_id=caller.key_id,
        keys=keys,
        policy=CachePolicy(**job_in.cache.model_dump()),
        params=params,
    )
    if hit is not None:
        session.commit()
    return hit


@router.post(
    "",
    response_model=JobPublic,
    status_code=status.HTTP_202_ACCEPTED,
    responses={200: {"model": JobPublic, "description": "Answered from the cache"}},
)
def create_job(
    job_in: JobCreate,
    caller: WriterDep,
    session: SessionDep,
    publisher: PublisherDep,
    served: ServedModelsDep,
    limits: LimitsDep,
    retriever: RetrieverDep,
    cache: ResponseCacheDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> JobPublic:
    """Submit a generation job; it is stored before it is queued."""
    model, params = _resolve(session, caller.tenant_id, job_in, served)
    request_hash = _request_hash(job_in)
    if idempotency_key and (
        job := _replay(session, caller.tenant_id, idempotency_key, request_hash)
    ):
        return JobPublic.from_row(job)
    conversation_id, parent_id = _thread(session, caller.tenant_id, job_in)
    admit(session, tenant_id=caller.tenant_id, max_queued=limits.max_queued_jobs_per_tenant)
    if job_in.cache is not None and (
        hit := _cached(session, cache, caller, job_in, model, params, conversation_id)
    ):
        response.status_code = status.HTTP_200_OK
        response.headers["Location"] = f"/v1/jobs/{hit.job.id}"
        return JobPublic.from_row(hit.job).model_copy(update={"cached": True})
    context = None
    if job_in.rag is not None:
        context = retriever.ground(
            session,
            tenant_id=caller.tenant_id,
            options=job_in.rag.model_dump(mode="json"),
            question=_question(job_in),
        )
    request = JobRequest(
        model=model,
        queue=job_in.queue,
        input=job_in.input.model_dump(exclude_none=True),
        params=params,
        metadata=job_in.metadata,
        conversation_id=conversation_id,
        parent_generation_id=parent_id,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        context=context,
    )
    try:
        job = store_job(
            session, tenant_id=caller.tenant_id, request=request, api_key_id=caller.key_id
        )
        session.commit()
    except IntegrityError:
        # Another request with the same Idempotency-Key committed first; or the turn this
        # one continues was deleted meanwhile.
        session.rollback()
        if idempotency_key and (
            replayed := _replay(session, caller.tenant_id, idempotency_key, request_hash)
        ):
            return JobPublic.from_row(replayed)
        raise Conflict(
            "the conversation or generation this job continues changed meanwhile; retry",
            code="conflict",
        ) from None
    publish_job(session, publisher, job)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobPublic.from_row(job)


def _get_job(session: Session, tenant_id: int, job_id: str) -> Job:
    job = crud.get_job(session, tenant_id=tenant_id, job_id=job_id)
    if job is None:
        raise NotFound(f"job {job_id!r} not found", param="job_id")
    return job


@router.get("/{job_id}", response_model=JobPublic)
def read_job(job_id: str, caller: CallerDep, session: SessionDep) -> JobPublic:
    """A job and its status."""
    return JobPublic.from_row(_get_job(session, caller.tenant_id, job_id))


@router.get("", response_model=Page[JobPublic])
def read_jobs(
    caller: CallerDep,
    session: SessionDep,
    filters: Annotated[crud.Filters, Depends(list_filters)],
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
    job_id: Annotated[
        list[str] | None,
        Query(
            alias="id",
            max_length=MAX_IDS,
            description=f"Only these jobs (repeat, at most {MAX_IDS}): one request follows many",
        ),
    ] = None,
    cursor: Cursor = None,
    limit: Limit = 20,
) -> Page[JobPublic]:
    """The caller's jobs, newest first, filtered."""
    rows, has_more = crud.list_jobs(
        session,
        tenant_id=caller.tenant_id,
        filters=replace(filters, status=status),
        cursor=cursor,
        limit=limit,
        ids=job_id or (),
    )
    return Page[JobPublic].of(rows, has_more, JobPublic.from_row)


async def _job_events(
    http: Request, factory: sessionmaker[Session], source: EventSource, job: Job
) -> AsyncIterator[bytes]:
    try:
        async for item in follow_job(factory, source, tenant_id=job.tenant_id, job_id=job.id):
            if isinstance(item, Delta):
                yield sse_event("token", {"text": item.text})
            elif isinstance(item, Finished):
                yield sse_event("end", JobPublic.from_row(item.job).model_dump(mode="json"))
            elif await http.is_disconnected():
                return
    except Restarted as exc:
        # The job goes on in a new attempt; the stream says so instead of breaking off.
        yield sse_event("error", interrupted(job, exc))


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def read_job_events(
    job_id: str,
    http: Request,
    caller: CallerDep,
    factory: SessionmakerDep,
    source: EventsDep,
) -> StreamingResponse:
    """The job's text as Server-Sent Events: `token` events as made, then one `end`."""
    job = await load_job(factory, caller.tenant_id, job_id)
    if job is None:
        raise NotFound(f"job {job_id!r} not found", param="job_id")
    return event_stream(_job_events(http, factory, source, job))


def cancel_unfinished(session: Session, job: Job, *, name: str, param: str) -> Job:
    """Cancel a queued job, or ask a running one to stop (crud.cancel_job), and commit;
    409 naming it as `name` when it has already succeeded or failed."""
    if job.status in ("succeeded", "failed"):
        raise Conflict(
            f"{name} {job.id!r} has already {job.status}", param=param, code="job_finished"
        )
    job = crud.cancel_job(session, job=job)
    session.commit()
    return job


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, caller: WriterDep, session: SessionDep) -> JobPublic:
    """Cancel a queued job, or stop a running one at its next token."""
    job = _get_job(session, caller.tenant_id, job_id)
    return JobPublic.from_row(cancel_unfinished(session, job, name="job", param="job_id"))
