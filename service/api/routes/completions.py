"""OpenAI's /v1/completions and /v1/embeddings: jobs like any other, answered in its shapes."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.api.deps import EmbeddingModelDep, LimitsDep, ServedModelsDep, ServingDep
from service.api.errors import ERROR_RESPONSES
from service.openai_compat.protocol import (
    CompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    TextCompletion,
)
from service.openai_compat.serving import SSE_RESPONSE, answer, serve_generation, submit
from service.submit import served_model

router = APIRouter(prefix="/v1", tags=["openai"], responses=ERROR_RESPONSES)


@router.post("/completions", response_model=TextCompletion, responses=SSE_RESPONSE)
async def create_completion(
    body: CompletionRequest,
    http: Request,
    serving: ServingDep,
    served: ServedModelsDep,
    limits: LimitsDep,
) -> Response:
    """Continue a raw prompt (no chat template); streamed with stream: true."""
    return await serve_generation(
        http, serving, body, served=served, max_queued=limits.max_queued_jobs_per_tenant
    )


@router.post("/embeddings", response_model=EmbeddingList)
async def create_embeddings(
    body: EmbeddingRequest,
    http: Request,
    serving: ServingDep,
    embedding_model: EmbeddingModelDep,
    limits: LimitsDep,
) -> Response:
    """Embed one text or a list of them, as float lists or base64 float32."""
    spec = served_model(body.model, (embedding_model,), task="embedding")
    job_request = body.to_job(spec, queue="embed")
    job = await submit(serving, job_request, max_queued=limits.max_queued_jobs_per_tenant)
    return await answer(http, serving, job)
