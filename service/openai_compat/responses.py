"""OpenAI response bodies built from stored jobs and generations, and SSE framing.

The HTTP routes and the batch finalizer both answer through these, so a batch's output
line carries the same body as the same request sent alone.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

import numpy as np

from service.api.schemas import Citation
from service.db.tables import Generation, Job
from service.openai_compat.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatMessageOut,
    CompletionUsage,
    EmbeddingData,
    EmbeddingList,
    EmbeddingUsage,
    TextChoice,
    TextCompletion,
)

# Public ids of a job's answer in each API; the job id is recoverable from them.
ID_PREFIXES = {"chat.completions": "chatcmpl-", "completions": "cmpl-", "embeddings": "emb-"}
JOB_PREFIX = "job_"


def public_id(api: str, job_id: str) -> str:
    return ID_PREFIXES[api] + job_id.removeprefix(JOB_PREFIX)


def job_id_of(api: str, public: str) -> str | None:
    """The job behind a public id of api, or None when the id is not of that shape."""
    prefix = ID_PREFIXES[api]
    if not public.startswith(prefix) or len(public) > 64:
        return None
    return JOB_PREFIX + public.removeprefix(prefix)


def unix(moment: datetime) -> int:
    return int(moment.timestamp())


def usage_of(generation: Generation) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
        total_tokens=generation.prompt_tokens + generation.completion_tokens,
    )


def grounding(generation: Generation) -> dict[str, Any]:
    """A grounded answer's extra fields: the sources it cites and its generation id (where
    /v1/generations/{id}/sources lists all it was given); nothing for other answers."""
    if not generation.sources:
        return {}
    cited = [Citation.from_source(source) for source in generation.sources if source.cited]
    return {"citations": cited, "generation_id": generation.id}


def chat_completion(job: Job, generation: Generation) -> ChatCompletion:
    return ChatCompletion(
        id=public_id("chat.completions", job.id),
        created=unix(job.created_at),
        model=job.model,
        choices=[
            ChatChoice(
                message=ChatMessageOut(content=generation.output),
                finish_reason=generation.finish_reason,
            )
        ],
        usage=usage_of(generation),
        system_fingerprint=generation.model_version,
        metadata=generation.meta if job.store else None,
        **grounding(generation),
    )


def text_completion(job: Job, generation: Generation) -> TextCompletion:
    return TextCompletion(
        id=public_id("completions", job.id),
        created=unix(job.created_at),
        model=job.model,
        choices=[TextChoice(text=generation.output, finish_reason=generation.finish_reason)],
        usage=usage_of(generation),
        system_fingerprint=generation.model_version,
    )


def embedding_list(job: Job, encoding_format: str) -> EmbeddingList:
    """The vectors a finished embeddings job stored (base64 of little-endian float32)."""
    assert job.result is not None
    encoded: list[str] = job.result["embeddings"]
    data = [
        EmbeddingData(
            index=index,
            embedding=vector
            if encoding_format == "base64"
            else np.frombuffer(base64.b64decode(vector), dtype="<f4").tolist(),
        )
        for index, vector in enumerate(encoded)
    ]
    tokens = int(job.result["prompt_tokens"])
    return EmbeddingList(
        data=data, model=job.model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    )


def response_body(job: Job) -> dict[str, Any]:
    """The body a succeeded job of an OpenAI API answers with."""
    if job.api == "embeddings":
        return embedding_list(job, job.params.get("encoding_format", "float")).model_dump()
    assert job.generation is not None
    if job.api == "completions":
        return text_completion(job, job.generation).model_dump()
    return chat_completion(job, job.generation).model_dump(exclude_none=True)


def failure_error(job: Job) -> tuple[int, dict[str, Any]]:
    """(status, OpenAI error object) for a job that failed or was cancelled."""
    stored = (job.result or {}).get("error")
    if stored:
        return 400, {"type": "invalid_request_error", "param": None, "code": None, **stored}
    if job.status == "cancelled":
        message, code = f"job {job.id} was cancelled", "cancelled"
        return 409, {"message": message, "type": "conflict_error", "param": None, "code": code}
    message = f"the generation failed: {job.error or 'unknown error'} (job {job.id})"
    return 500, {"message": message, "type": "server_error", "param": None, "code": None}


_CHUNK_OBJECTS = {"chat.completions": "chat.completion.chunk", "completions": "text_completion"}


def stream_chunk(
    job: Job, *, choice: dict[str, Any] | None = None, usage: CompletionUsage | None = None
) -> dict[str, Any]:
    """A streamed chunk of the job's API; with usage and no choice, the usage-only one.

    choice holds {"delta": {...}} for chat and {"text": ...} for completions, and
    finish_reason on the last.
    """
    chunk: dict[str, Any] = {
        "id": public_id(job.api, job.id),
        "object": _CHUNK_OBJECTS[job.api],
        "created": unix(job.created_at),
        "model": job.model,
        "choices": [],
    }
    if choice is not None:
        chunk["choices"] = [{"index": 0, "finish_reason": None, "logprobs": None, **choice}]
    if usage is not None:
        chunk["usage"] = usage.model_dump()
    return chunk


def sse(data: dict[str, Any] | str) -> bytes:
    """One Server-Sent Events message."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def sse_event(event: str, data: dict[str, Any]) -> bytes:
    """A named event, for the native /v1/jobs/{id}/events stream."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
