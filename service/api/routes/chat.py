"""OpenAI's /v1/chat/completions: create (plain or streamed), and the stored completions."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.orm import Session

from service.api.deps import (
    CallerDep,
    LimitsDep,
    ServedModelsDep,
    ServingDep,
    SessionDep,
    WriterDep,
    audit,
)
from service.api.errors import ERROR_RESPONSES, InvalidRequest, NotFound
from service.db import crud
from service.db.tables import Job
from service.openai_compat.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    CursorList,
    Deleted,
    MetadataUpdate,
    StoredMessage,
)
from service.openai_compat.responses import chat_completion, job_id_of, public_id
from service.openai_compat.serving import SSE_RESPONSE, serve_generation

router = APIRouter(prefix="/v1/chat/completions", tags=["chat"], responses=ERROR_RESPONSES)

API = "chat.completions"
Order = Literal["asc", "desc"]
ListLimit = Annotated[int, Query(ge=1, le=100)]


@router.post("", response_model=ChatCompletion, responses=SSE_RESPONSE)
async def create_chat_completion(
    body: ChatCompletionRequest,
    http: Request,
    serving: ServingDep,
    served: ServedModelsDep,
    limits: LimitsDep,
) -> Response:
    """Answer a conversation; streamed with stream: true. Every answer is a generation."""
    return await serve_generation(
        http, serving, body, served=served, max_queued=limits.max_queued_jobs_per_tenant
    )


def _metadata_query(http: Request) -> dict[str, str]:
    """OpenAI's clients send metadata filters as metadata[key]=value."""
    pairs: dict[str, str] = {}
    for name, value in http.query_params.multi_items():
        if name.startswith("metadata[") and name.endswith("]") and len(name) > 10:
            pairs[name[9:-1]] = value
        elif name == "metadata":
            raise InvalidRequest("filter metadata as metadata[key]=value", param="metadata")
    return pairs


def _stored(session: Session, tenant_id: int, completion_id: str) -> Job:
    job_id = job_id_of(API, completion_id)
    job = crud.get_job(session, tenant_id=tenant_id, job_id=job_id) if job_id else None
    if job is None or job.api != API or not job.store or job.generation is None:
        raise NotFound(f"stored chat completion {completion_id!r} not found", param="completion_id")
    return job


def _after_job(after: str | None) -> str | None:
    if after is None:
        return None
    job_id = job_id_of(API, after)
    if job_id is None:
        raise InvalidRequest(f"after {after!r} is not a chat completion id", param="after")
    return job_id


@router.get("", response_model=CursorList)
def read_chat_completions(
    http: Request,
    caller: CallerDep,
    session: SessionDep,
    model: Annotated[str | None, Query(max_length=128)] = None,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: ListLimit = 20,
    order: Order = "asc",
) -> CursorList:
    """Stored chat completions (store: true), filtered by model and metadata[key]=value."""
    jobs, has_more = crud.list_stored_jobs(
        session,
        tenant_id=caller.tenant_id,
        api=API,
        filters=crud.Filters(model=model, metadata=_metadata_query(http)),
        after=_after_job(after),
        limit=limit,
        descending=order == "desc",
    )
    data = [chat_completion(job, job.generation) for job in jobs if job.generation]
    return CursorList.of(data, has_more)


@router.get("/{completion_id}", response_model=ChatCompletion)
def read_chat_completion(
    completion_id: str, caller: CallerDep, session: SessionDep
) -> ChatCompletion:
    """One stored chat completion."""
    job = _stored(session, caller.tenant_id, completion_id)
    assert job.generation is not None
    return chat_completion(job, job.generation)


@router.get("/{completion_id}/messages", response_model=CursorList)
def read_chat_completion_messages(
    completion_id: str,
    caller: CallerDep,
    session: SessionDep,
    after: Annotated[str | None, Query(max_length=80)] = None,
    limit: ListLimit = 20,
    order: Order = "asc",
) -> CursorList:
    """The messages a stored chat completion answered."""
    job = _stored(session, caller.tenant_id, completion_id)
    messages = [
        StoredMessage(id=f"{completion_id}-{index}", role=m["role"], content=m["content"])
        for index, m in enumerate(job.input["messages"])
    ]
    if order == "desc":
        messages.reverse()
    ids = [m.id for m in messages]
    if after is not None and after not in ids:
        raise InvalidRequest(f"after {after!r} is not a message of {completion_id}", param="after")
    start = ids.index(after) + 1 if after is not None else 0
    page = messages[start : start + limit]
    return CursorList.of(page, start + limit < len(messages))


@router.post("/{completion_id}", response_model=ChatCompletion)
def update_chat_completion(
    completion_id: str, body: MetadataUpdate, caller: WriterDep, session: SessionDep
) -> ChatCompletion:
    """Replace a stored chat completion's metadata."""
    job = _stored(session, caller.tenant_id, completion_id)
    crud.set_job_metadata(session, job=job, metadata=dict(body.metadata or {}))
    session.commit()
    assert job.generation is not None
    return chat_completion(job, job.generation)


@router.delete("/{completion_id}", response_model=Deleted)
def delete_chat_completion(completion_id: str, caller: WriterDep, session: SessionDep) -> Deleted:
    """Delete a stored chat completion: its generation, embeddings and request."""
    job = _stored(session, caller.tenant_id, completion_id)
    crud.delete_job(session, job=job)
    audit(session, caller, "chat_completion.delete", job.id)
    session.commit()
    return Deleted(id=public_id(API, job.id), object="chat.completion.deleted")
