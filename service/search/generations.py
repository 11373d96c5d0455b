"""Search past generations by meaning, by words or by both.

Vector search: FAISS finds candidates in the tenant's shard and SQL says which the caller
may see; a selective filter is resolved in SQL first so FAISS scores exactly the rows that
pass it. Keyword search: the database's full-text engine (service/search/keyword.py).
Hybrid: reciprocal rank fusion of the two rankings, weighted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy.orm import Session

from service.db import crud
from service.db.tables import Generation
from service.search.index import VectorIndex
from service.search.keyword import keyword_search

KINDS = {"prompt": ("prompt",), "output": ("output",), "both": ("prompt", "output")}
MODES = ("vector", "keyword", "hybrid")
HYBRID_DEPTH = 100  # candidates each ranking contributes to a fusion, at least
SUBSET_LIMIT = 50_000  # a filter matching at most this many rows is resolved in SQL first
RRF_K = 60


@dataclass(frozen=True)
class Part:
    """One ranking's say about a hit: its score there and its 1-based rank."""

    score: float
    rank: int


@dataclass(frozen=True)
class Fusion:
    """How hybrid search weighs its rankings: sum of weight / (rrf_k + rank)."""

    vector: float = 1.0
    keyword: float = 1.0
    rrf_k: int = RRF_K


@dataclass
class Hit:
    generation: Generation
    score: float  # cosine (vector), engine score (keyword) or fused score (hybrid)
    vector: Part | None = None
    keyword: Part | None = None
    matched: str | None = None  # the text whose embedding matched: prompt or output


@dataclass
class Results:
    hits: list[Hit] = field(default_factory=list)
    has_more: bool = False


def search_generations(
    session: Session,
    *,
    tenant_id: int,
    query: str,
    mode: str,
    target: str,
    filters: crud.Filters,
    offset: int,
    limit: int,
    index: VectorIndex | None = None,
    embed: Callable[[str], np.ndarray] | None = None,
    fusion: Fusion | None = None,
) -> Results:
    """The tenant's generations ranked for the query; hits offset..offset+limit of them.

    index and embed are needed for the vector and hybrid modes.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    fusion = fusion or Fusion()
    wanted = offset + limit + 1  # one more tells whether another page exists
    depth = max(wanted, HYBRID_DEPTH) if mode == "hybrid" else wanted
    # Hybrid asks a ranking only when its weight can count.
    use_vector = mode == "vector" or (mode == "hybrid" and fusion.vector > 0)
    use_keyword = mode == "keyword" or (mode == "hybrid" and fusion.keyword > 0)
    vector: list[tuple[str, float, str]] = []
    keyword: list[tuple[str, float]] = []
    if use_vector:
        if index is None or embed is None:
            raise ValueError(f"{mode} search needs an index and an embedder")
        vector = vector_candidates(
            session,
            index=index,
            query_vector=embed(query),
            tenant_id=tenant_id,
            k=depth,
            target=target,
            filters=filters,
        )
    if use_keyword:
        found = keyword_search(
            session, tenant_id=tenant_id, query=query, target=target, limit=depth, filters=filters
        )
        keyword = [(hit.generation_id, hit.score) for hit in found]
    vector_parts = {gid: Part(score, rank) for rank, (gid, score, _) in enumerate(vector, 1)}
    keyword_parts = {gid: Part(score, rank) for rank, (gid, score) in enumerate(keyword, 1)}
    if mode == "vector":
        ranked = [(gid, score) for gid, score, _ in vector]
    elif mode == "keyword":
        ranked = keyword
    else:
        ranked = fuse(vector_parts, keyword_parts, fusion)
    page = ranked[offset : offset + limit]
    rows = crud.get_generations(session, ids=[gid for gid, _ in page])
    matched = {gid: kind for gid, _, kind in vector}
    hits = [
        Hit(
            generation=rows[gid],
            score=score,
            vector=vector_parts.get(gid),
            keyword=keyword_parts.get(gid),
            matched=matched.get(gid),
        )
        for gid, score in page
        if gid in rows
    ]
    return Results(hits=hits, has_more=len(ranked) > offset + limit)


def fuse(
    vector: dict[str, Part], keyword: dict[str, Part], fusion: Fusion
) -> list[tuple[str, float]]:
    """Reciprocal rank fusion: (id, fused score), best first, ties by id."""
    scores: dict[str, float] = {}
    for weight, parts in ((fusion.vector, vector), (fusion.keyword, keyword)):
        for gid, part in parts.items():
            scores[gid] = scores.get(gid, 0.0) + weight / (fusion.rrf_k + part.rank)
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


def vector_candidates(
    session: Session,
    *,
    index: VectorIndex,
    query_vector: np.ndarray,
    tenant_id: int,
    k: int,
    target: str,
    filters: crud.Filters,
) -> list[tuple[str, float, str]]:
    """The k generations of the tenant closest to the query: (id, cosine, kind), best first.

    A generation has at most one embedding per kind, so k * kinds embedding hits always
    hold k distinct generations when that many match.
    """
    kinds = KINDS[target]
    index.catch_up(session)
    allowed = None
    if filters.narrows_generations:
        allowed = crud.embedding_ids_matching(
            session,
            tenant_id=tenant_id,
            model=index.model,
            kinds=kinds,
            filters=filters,
            limit=SUBSET_LIMIT,
        )
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

    hits = index.search(query_vector, k * len(kinds), accept, shard=tenant_id, allowed=allowed)
    best: dict[str, tuple[float, str]] = {}
    for embedding_id, score in hits:
        generation_id, kind = matched[embedding_id]
        if generation_id not in best:
            best[generation_id] = (score, kind)
    return [(gid, score, kind) for gid, (score, kind) in list(best.items())[:k]]
