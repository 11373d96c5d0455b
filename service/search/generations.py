"""Search past generations by meaning, by words or by both.

Vector search: FAISS finds candidates in the tenant's shard and SQL says which the caller
may see; a selective filter is resolved in SQL first so FAISS scores exactly the rows that
pass it. Keyword search: the database's full-text engine (service/search/keyword.py).
Hybrid: reciprocal rank fusion of the two rankings, weighted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

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


K = TypeVar("K", str, int)  # what a ranking ranks: generation ids, chunk ids


@dataclass(frozen=True)
class Plan:
    """Which rankings a search asks, and how deep each goes."""

    vector: bool
    keyword: bool
    depth: int

    @classmethod
    def of(cls, mode: str, wanted: int, fusion: Fusion) -> Plan:
        """wanted results in mode; hybrid asks a ranking only when its weight can count,
        and at least HYBRID_DEPTH candidates of each."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        hybrid = mode == "hybrid"
        return cls(
            vector=mode == "vector" or (hybrid and fusion.vector > 0),
            keyword=mode == "keyword" or (hybrid and fusion.keyword > 0),
            depth=max(wanted, HYBRID_DEPTH) if hybrid else wanted,
        )


@dataclass
class Ranking(Generic[K]):
    """The results of a mode, best first, with each ranking's part in them."""

    ranked: list[tuple[K, float]]
    vector: dict[K, Part]
    keyword: dict[K, Part]


def rank(
    mode: str, vector: list[tuple[K, float]], keyword: list[tuple[K, float]], fusion: Fusion
) -> Ranking[K]:
    """One ranking for the mode from the vector and keyword ones (id, score), best first."""
    vector_parts = {key: Part(score, place) for place, (key, score) in enumerate(vector, 1)}
    keyword_parts = {key: Part(score, place) for place, (key, score) in enumerate(keyword, 1)}
    if mode == "vector":
        ranked = vector
    elif mode == "keyword":
        ranked = keyword
    else:
        ranked = fuse(vector_parts, keyword_parts, fusion)
    return Ranking(ranked, vector_parts, keyword_parts)


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
    fusion = fusion or Fusion()
    # One more than the page tells whether another page exists.
    plan = Plan.of(mode, offset + limit + 1, fusion)
    vector: list[tuple[str, float, str]] = []
    keyword: list[tuple[str, float]] = []
    if plan.vector:
        if index is None or embed is None:
            raise ValueError(f"{mode} search needs an index and an embedder")
        vector = vector_candidates(
            session,
            index=index,
            query_vector=embed(query),
            tenant_id=tenant_id,
            k=plan.depth,
            target=target,
            filters=filters,
        )
    if plan.keyword:
        found = keyword_search(
            session,
            tenant_id=tenant_id,
            query=query,
            target=target,
            limit=plan.depth,
            filters=filters,
        )
        keyword = [(hit.generation_id, hit.score) for hit in found]
    ranking = rank(mode, [(gid, score) for gid, score, _ in vector], keyword, fusion)
    ranked = ranking.ranked
    page = ranked[offset : offset + limit]
    rows = crud.get_generations(session, ids=[gid for gid, _ in page])
    matched = {gid: kind for gid, _, kind in vector}
    hits = [
        Hit(
            generation=rows[gid],
            score=score,
            vector=ranking.vector.get(gid),
            keyword=ranking.keyword.get(gid),
            matched=matched.get(gid),
        )
        for gid, score in page
        if gid in rows
    ]
    return Results(hits=hits, has_more=len(ranked) > offset + limit)


def fuse(vector: dict[K, Part], keyword: dict[K, Part], fusion: Fusion) -> list[tuple[K, float]]:
    """Reciprocal rank fusion: (id, fused score), best first, ties by id."""
    scores: dict[K, float] = {}
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
