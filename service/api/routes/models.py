"""The models this server runs: OpenAI's GET /v1/models, with every trained version."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy.orm import Session

from models.registry import REGISTRY, TRAINED_FAMILIES
from service import trained
from service.api.deps import (
    CallerDep,
    EmbeddingModelDep,
    ServedModelsDep,
    SessionDep,
    WriterDep,
    audit,
)
from service.api.errors import ERROR_RESPONSES, Conflict, NotFound
from service.checkpoints import BUILTIN_OWNER
from service.db import training
from service.db.tables import ModelVersion
from service.openai_compat.protocol import ModelCard, ModelList, TrainedModelCard

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES)

# Model cards carry a creation time; a fixed one keeps listings stable across restarts.
CREATED = 1_767_225_600  # 2026-01-01


def _names(served: tuple[str, ...], embedding_model: str) -> list[str]:
    return [*served, embedding_model]


def _card(row: ModelVersion, default: ModelVersion | None, tenant: str) -> TrainedModelCard:
    return TrainedModelCard(
        id=row.ref,
        created=int(row.created_at.timestamp()),
        owned_by=BUILTIN_OWNER if row.tenant_id is None else tenant,
        name=row.name,
        version=row.version,
        family=row.family,
        tasks=sorted(TRAINED_FAMILIES[row.family][1]),
        default=default is not None and row.id == default.id,
        config=row.config,
        metrics=row.metrics,
        dataset_file_id=row.dataset_file_id,
        dataset_sha256=row.dataset_sha256,
        artifact_sha256=row.artifact_sha256,
        parent_version=row.parent_version,
        created_by=row.created_by,
        training_job_id=row.training_job_id,
        promoted_at=int(row.promoted_at.timestamp()) if row.promoted_at else None,
    )


def _trained_cards(session: Session, tenant_id: int, tenant: str, name: str | None = None):  # noqa: ANN202
    versions = training.list_versions(session, tenant_id=tenant_id, name=name)
    by_name: dict[str, list[ModelVersion]] = {}
    for row in versions:
        by_name.setdefault(row.name, []).append(row)
    cards = []
    for rows in by_name.values():
        # A tenant's own name shadows a built-in one.
        rows = [r for r in rows if r.tenant_id is not None] or rows
        default = training.served_version(rows)
        cards += [_card(row, default, tenant) for row in rows]
    return cards


@router.get("", response_model=ModelList)
def read_models(
    caller: CallerDep,
    session: SessionDep,
    served: ServedModelsDep,
    embedding_model: EmbeddingModelDep,
) -> ModelList:
    """The language and embedding models served here, and every trained model version."""
    fixed = [ModelCard(id=name, created=CREATED) for name in _names(served, embedding_model)]
    return ModelList(data=[*fixed, *_trained_cards(session, caller.tenant_id, caller.tenant)])


@router.get("/{model}", response_model=TrainedModelCard | ModelCard)
def read_model(
    model: str,
    caller: CallerDep,
    session: SessionDep,
    served: ServedModelsDep,
    embedding_model: EmbeddingModelDep,
) -> TrainedModelCard | ModelCard:
    """One served model, or one trained version ("name" for the default, "name:3")."""
    if model in _names(served, embedding_model) and model in REGISTRY:
        return ModelCard(id=model, created=CREATED)
    row = trained.resolve_version(session, tenant_id=caller.tenant_id, model=model)
    if row is None:
        raise NotFound(f"model {model!r} is not served here", param="model", code="model_not_found")
    cards = _trained_cards(session, caller.tenant_id, caller.tenant, name=row.name)
    return next(card for card in cards if card.version == row.version)


@router.get("/{name}/versions", response_model=ModelList)
def read_model_versions(name: str, caller: CallerDep, session: SessionDep) -> ModelList:
    """Every version of a trained model, oldest first."""
    cards = _trained_cards(session, caller.tenant_id, caller.tenant, name=name)
    if not cards:
        raise NotFound(f"model {name!r} not found", param="name", code="model_not_found")
    return ModelList(data=cards)


@router.post("/{name}/versions/{version}/promote", response_model=TrainedModelCard)
def promote_model_version(
    name: str, version: int, caller: WriterDep, session: SessionDep
) -> TrainedModelCard:
    """Serve this version when a request names the model without a version."""
    row = training.get_version(session, tenant_id=caller.tenant_id, name=name, version=version)
    if row is None:
        raise NotFound(f"model {name}:{version} not found", param="version")
    if row.tenant_id is None:
        raise Conflict(
            f"{row.ref} ships with genserve; train a version of your own to promote",
            param="name",
            code="builtin_model",
        )
    training.promote_version(session, row=row)
    audit(session, caller, "model.promote", row.ref)
    session.commit()
    cards = _trained_cards(session, caller.tenant_id, caller.tenant, name=name)
    return next(card for card in cards if card.version == version)
