"""Serving an OpenAI request through the job queue: submit, then stream or wait.

Every request is a job like any other (stored first, published, run by a worker). A
streamed request relays the worker's tokens as Server-Sent Events; a plain one waits
for the stored result. A client that goes away cancels its job: the worker stops at its
next cancellation check.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import anyio
from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.orm import Session, sessionmaker

from service.api.errors import error_json
from service.cache import CacheHit, CachePolicy, ResponseCache
from service.db import crud
from service.db.tables import Job
from service.events import EventSource
from service.follow import Delta, Finished, Idle, Restarted, follow_job
from service.openai_compat.protocol import ChatCompletionRequest, CompletionRequest
from service.openai_compat.responses import (
    failure_error,
    grounding,
    response_body,
    sse,
    stream_chunk,
    usage_of,
)
from service.queue import JobPublisher
from service.rag.retrieval import Retriever
from service.submit import JobRequest, admit, request_cache_keys, served_model, submit_job

# Declared on routes that may answer with a stream, for the OpenAPI docs.
SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "With stream: true"}
}
# Set on an answer served from the response cache.
CACHE_HEADER = "X-Genserve-Cache"
# An idle stream sends an SSE comment this often, so proxies keep the connection open.
KEEPALIVE_S = 15.0
# How often a waiting request asks whether its client is still there.
DISCONNECT_CHECK_S = 0.5


@dataclass(frozen=True)
class Serving:
    """What serving one request needs from the app."""

    factory: sessionmaker[Session]
    source: EventSource
    publisher: JobPublisher
    tenant_id: int
    api_key_id: int | None = None
    retriever: Retriever | None = None
    cache: ResponseCache | None = None


def _submit(
    serving: Serving, request: JobRequest, max_queued: int, rag: dict[str, Any] | None
) -> Job:
    with serving.factory() as session:
        admit(session, tenant_id=serving.tenant_id, max_queued=max_queued)
        if rag is not None:
            assert serving.retriever is not None, "grounding needs the app's retriever"
            question = request.input["messages"][-1]["content"]
            context = serving.retriever.ground(
                session, tenant_id=serving.tenant_id, options=rag, question=question
            )
            request = replace(request, context=context)
        return submit_job(
            session,
            serving.publisher,
            tenant_id=serving.tenant_id,
            request=request,
            api_key_id=serving.api_key_id,
        )


async def submit(
    serving: Serving, request: JobRequest, *, max_queued: int, rag: dict[str, Any] | None = None
) -> Job:
    """Store and publish the job, off the event loop; with rag, grounded in its passages."""
    return await anyio.to_thread.run_sync(_submit, serving, request, max_queued, rag)


def _cancel(serving: Serving, job_id: str) -> None:
    with serving.factory() as session:
        job = crud.get_job(session, tenant_id=serving.tenant_id, job_id=job_id)
        if job is not None and job.status in ("queued", "running"):
            crud.cancel_job(session, job=job)
            session.commit()


async def cancel_abandoned(serving: Serving, job_id: str) -> None:
    """Cancel the job of a client that left; shielded, as it runs while being cancelled."""
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(_cancel, serving, job_id)


class _ClientWatch:
    """Asks at most every DISCONNECT_CHECK_S whether the client has gone."""

    def __init__(self, request: Request) -> None:
        self._request = request
        self._next = 0.0

    async def gone(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + DISCONNECT_CHECK_S
        return await self._request.is_disconnected()


def interrupted(job: Job, exc: Restarted) -> dict[str, Any]:
    """The error a stream ends with when its job restarted: the result comes in SQL."""
    message = f"the stream was interrupted ({exc}); the result will be at /v1/jobs/{job.id}"
    return {"message": message, "type": "server_error", "param": None, "code": "restarted"}


def _error_response(job: Job) -> JSONResponse:
    status, error = failure_error(job)
    return error_json(
        status, error["message"], type_=error["type"], param=error["param"], code=error["code"]
    )


async def answer(http: Request, serving: Serving, job: Job) -> JSONResponse:
    """Wait for the job and answer with its body, or its error."""
    watch = _ClientWatch(http)
    finished: Job | None = None
    try:
        async for item in follow_job(
            serving.factory, serving.source, tenant_id=serving.tenant_id, job_id=job.id, text=False
        ):
            if isinstance(item, Finished):
                finished = item.job
                break
            if await watch.gone():
                break
    finally:
        if finished is None:
            await cancel_abandoned(serving, job.id)
    if finished is None:  # nobody reads this answer
        return error_json(499, "the client closed the request", type_="invalid_request_error")
    if finished.status != "succeeded":
        return _error_response(finished)
    return JSONResponse(response_body(finished))


def _choice(job: Job, text: str, finish_reason: str | None = None) -> dict[str, Any]:
    if job.api == "chat.completions":
        delta = {"content": text} if text else {}
        return {"delta": delta, "finish_reason": finish_reason}
    return {"text": text, "finish_reason": finish_reason}


def _ending(job: Job, finished: Job, include_usage: bool) -> list[bytes]:
    if finished.status != "succeeded" or finished.generation is None:
        return [sse({"error": failure_error(finished)[1]})]
    generation = finished.generation
    last = stream_chunk(job, choice=_choice(job, "", generation.finish_reason))
    extra = grounding(generation)
    if extra:  # a grounded answer's citations ride on its last chunk
        last["citations"] = [citation.model_dump() for citation in extra["citations"]]
        last["generation_id"] = extra["generation_id"]
    frames = [sse(last)]
    if include_usage:
        frames.append(sse(stream_chunk(job, usage=usage_of(generation))))
    return frames


async def _events(
    http: Request, serving: Serving, job: Job, include_usage: bool
) -> AsyncIterator[bytes]:
    watch = _ClientWatch(http)
    done = False
    last_sent = time.monotonic()
    try:
        if job.api == "chat.completions":
            yield sse(stream_chunk(job, choice={"delta": {"role": "assistant", "content": ""}}))
        async for item in follow_job(
            serving.factory, serving.source, tenant_id=serving.tenant_id, job_id=job.id
        ):
            if isinstance(item, Delta):
                yield sse(stream_chunk(job, choice=_choice(job, item.text)))
                last_sent = time.monotonic()
            elif isinstance(item, Finished):
                for frame in _ending(job, item.job, include_usage):
                    yield frame
            elif isinstance(item, Idle):
                if await watch.gone():
                    return
                if time.monotonic() - last_sent > KEEPALIVE_S:
                    yield b": keep-alive\n\n"
                    last_sent = time.monotonic()
        done = True
        yield sse("[DONE]")
    except Restarted as exc:
        done = True  # the job goes on in a new attempt; its result is stored
        yield sse({"error": interrupted(job, exc)})
    finally:
        if not done:
            await cancel_abandoned(serving, job.id)


def _cached(
    serving: Serving,
    request: JobRequest,
    policy: CachePolicy,
    max_queued: int,
    stream: bool,
    include_usage: bool,
) -> Response | None:
    """The answer of the stored generation that answers request, counted as a cache hit;
    or None. Built while the session that read the generation is open."""
    if serving.cache is None:
        return None
    with serving.factory() as session:
        admit(session, tenant_id=serving.tenant_id, max_queued=max_queued)
        hit = serving.cache.answer(
            session,
            tenant_id=serving.tenant_id,
            api_key_id=serving.api_key_id,
            keys=request_cache_keys(serving.tenant_id, request),
            policy=policy,
            params=request.params,
        )
        if hit is None:
            return None
        answer = _cached_answer(hit, stream=stream, include_usage=include_usage)
        session.commit()
        return answer


def _cached_answer(hit: CacheHit, *, stream: bool, include_usage: bool) -> Response:
    """The original request's answer, marked cached: its body, or its text as one stream
    delta followed by the usual ending."""
    headers = {CACHE_HEADER: "hit"}
    if not stream:
        return JSONResponse(response_body(hit.job) | {"cached": True}, headers=headers)
    job = hit.job
    frames = []
    if job.api == "chat.completions":
        frames.append(
            sse(stream_chunk(job, choice={"delta": {"role": "assistant", "content": ""}}))
        )
    frames.append(sse(stream_chunk(job, choice=_choice(job, hit.generation.output))))
    frames.extend(_ending(job, job, include_usage))
    frames.append(sse("[DONE]"))

    async def replay() -> AsyncIterator[bytes]:
        for frame in frames:
            yield frame

    answer = event_stream(replay())
    answer.headers.update(headers)
    return answer


def event_stream(frames: AsyncIterator[bytes]) -> StreamingResponse:
    """Server-Sent Events, neither cached nor buffered by a proxy on the way."""
    return StreamingResponse(
        frames,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def stream(http: Request, serving: Serving, job: Job, *, include_usage: bool) -> StreamingResponse:
    """The job's tokens as OpenAI's Server-Sent Events, ending with data: [DONE]."""
    return event_stream(_events(http, serving, job, include_usage))


async def serve_generation(
    http: Request,
    serving: Serving,
    body: ChatCompletionRequest | CompletionRequest,
    *,
    served: tuple[str, ...],
    max_queued: int,
) -> Response:
    """A chat or text completion: submitted as an interactive job, streamed or awaited."""
    spec = served_model(body.model, served, task="chat")
    rag = getattr(body, "rag", None)
    request = body.to_job(spec, queue="interactive")
    if body.cache is not None and rag is None:
        policy = CachePolicy(**body.cache.model_dump())
        cached = await anyio.to_thread.run_sync(
            _cached, serving, request, policy, max_queued, bool(body.stream), body.include_usage
        )
        if cached is not None:
            return cached
    job = await submit(
        serving,
        request,
        max_queued=max_queued,
        rag=rag.model_dump(mode="json") if rag is not None else None,
    )
    if body.stream:
        return stream(http, serving, job, include_usage=body.include_usage)
    return await answer(http, serving, job)
