"""The models this server runs: OpenAI's GET /v1/models."""

from __future__ import annotations

from fastapi import APIRouter

from models.registry import REGISTRY
from service.api.deps import CallerDep, EmbeddingModelDep, ServedModelsDep
from service.api.errors import ERROR_RESPONSES, NotFound
from service.openai_compat.protocol import ModelCard, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES)

# Model cards carry a creation time; a fixed one keeps listings stable across restarts.
CREATED = 1_767_225_600  # 2026-01-01


def _names(served: tuple[str, ...], embedding_model: str) -> list[str]:
    return [*served, embedding_model]


@router.get("", response_model=ModelList)
def read_models(
    _caller: CallerDep, served: ServedModelsDep, embedding_model: EmbeddingModelDep
) -> ModelList:
    """The chat and embedding models served here."""
    return ModelList(
        data=[ModelCard(id=name, created=CREATED) for name in _names(served, embedding_model)]
    )


@router.get("/{model}", response_model=ModelCard)
def read_model(
    model: str, _caller: CallerDep, served: ServedModelsDep, embedding_model: EmbeddingModelDep
) -> ModelCard:
    """One served model."""
    if model not in _names(served, embedding_model) or model not in REGISTRY:
        raise NotFound(f"model {model!r} is not served here", param="model", code="model_not_found")
    return ModelCard(id=model, created=CREATED)
