"""Search past generations by meaning: FAISS for the candidates, SQL for who may see them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session

from service.db import crud
from service.db.tables import Generation
from service.search.index import VectorIndex

KINDS = {"prompt": ("prompt",), "output": ("output",), "both": ("prompt", "output")}


@dataclass(frozen=True)
class Hit:
    generation: Generation
    score: float
    matched: str


def search_generations(
    session: Session,
    *,
    index: VectorIndex,
    query_vector: np.ndarray,
    tenant_id: int,
    k: int,
    target: str,
    filters: crud.Filters,
) -> list[Hit]:
    """The k generations of the tenant closest to the query, best first.

    A generation has at most one embedding per kind, so 2k embedding hits always hold k
    distinct generations when that many match.
    """
    kinds = KINDS[target]
    index.catch_up(session)
    matched: dict[int, tuple[str, str]] = {}

    def accept(ids: Sequence[int]) -> set[int]:
        visible = crud.generations_for_embeddings(
            session,
            tenant_id=tenant_id,
            embedding_ids=ids,
            kinds=kinds,
            filters=filters,
        )
        matched.update(visible)
        return set(visible)

    hits = index.search(query_vector, k * len(kinds), accept)
    best: dict[str, tuple[float, str]] = {}
    for embedding_id, score in hits:
        generation_id, kind = matched[embedding_id]
        if generation_id not in best:
            best[generation_id] = (score, kind)
    top = list(best.items())[:k]
    rows = crud.get_generations(session, ids=[gid for gid, _ in top])
    return [Hit(rows[gid], score, kind) for gid, (score, kind) in top if gid in rows]
