"""Passages for a query from a tenant's collections, by meaning, by words or by both.

The engine is /v1/search's: FAISS (the chunk index, one shard per collection) with SQL
deciding what the caller may see, the database's full-text search, and reciprocal rank
fusion of the two (service/search/generations.py). A "history" collection answers with
the tenant's past generations, through the same search /v1/search runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.api.errors import NotFound, ServiceUnavailable
from service.db import crud, rag
from service.db.rag import DocumentFilters
from service.db.tables import Chunk, Collection, Document
from service.rag import grounding
from service.search.generations import MODES, SUBSET_LIMIT, Fusion, Part, Plan, rank
from service.search.generations import search_generations as _search_generations
from service.search.index import IndexNotReady, VectorIndex
from service.search.keyword import keyword_chunks


@dataclass
class Passage:
    """A retrieved passage: a document's chunk, or a past generation (history)."""

    collection_id: int
    title: str
    text: str
    score: float  # cosine (vector), engine score (keyword) or fused score (hybrid)
    vector: Part | None = None
    keyword: Part | None = None
    document_id: str | None = None
    external_id: str | None = None
    chunk_id: int | None = None
    generation_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return (
            f"chunk:{self.chunk_id}" if self.chunk_id is not None else f"gen:{self.generation_id}"
        )

    def scores(self) -> dict[str, Any]:
        """The ranking parts, as stored with a grounded generation's sources."""
        return {
            name: {"score": part.score, "rank": part.rank}
            for name, part in (("vector", self.vector), ("keyword", self.keyword))
            if part is not None
        }


def retrieve(
    session: Session,
    *,
    collections: Sequence[Collection],
    query: str,
    mode: str,
    k: int,
    filters: DocumentFilters,
    chunk_index: VectorIndex | None,
    generation_index: VectorIndex | None,
    embed: Callable[[str], np.ndarray] | None,
    fusion: Fusion | None = None,
) -> list[Passage]:
    """The k best passages of the collections for the query, best first.

    Documents' chunks are ranked in SQL and FAISS together across the collections; a
    history collection's generations are ranked apart and merged in by score.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    fusion = fusion or Fusion()
    # One embedding of the query serves the chunk index and the generation index.
    embed_once = functools.lru_cache(maxsize=1)(embed) if embed is not None else None
    passages: list[Passage] = []
    documents = [c for c in collections if c.kind == "documents"]
    if documents:
        passages += _chunk_passages(
            session,
            collections=documents,
            query=query,
            mode=mode,
            k=k,
            filters=filters,
            index=chunk_index,
            embed=embed_once,
            fusion=fusion,
        )
    for collection in (c for c in collections if c.kind == "history"):
        results = _search_generations(
            session,
            tenant_id=collection.tenant_id,
            query=query,
            mode=mode,
            target="both",
            filters=crud.Filters(),
            offset=0,
            limit=k,
            index=generation_index,
            embed=embed_once,
            fusion=fusion,
        )
        passages += [
            Passage(
                collection_id=collection.id,
                title=f"Earlier answer {hit.generation.id}",
                text=f"Question: {hit.generation.prompt}\nAnswer: {hit.generation.output}",
                score=hit.score,
                vector=hit.vector,
                keyword=hit.keyword,
                generation_id=hit.generation.id,
            )
            for hit in results.hits
        ]
    passages.sort(key=lambda passage: (-passage.score, passage.key))
    return passages[:k]


def _chunk_passages(
    session: Session,
    *,
    collections: Sequence[Collection],
    query: str,
    mode: str,
    k: int,
    filters: DocumentFilters,
    index: VectorIndex | None,
    embed: Callable[[str], np.ndarray] | None,
    fusion: Fusion,
) -> list[Passage]:
    ids = [collection.id for collection in collections]
    plan = Plan.of(mode, k, fusion)
    vector: list[tuple[int, float]] = []
    keyword: list[tuple[int, float]] = []
    if plan.vector:
        if index is None or embed is None:
            raise ValueError(f"{mode} search needs the chunk index and an embedder")
        vector = _vector_chunks(session, index, embed(query), ids, plan.depth, filters)
    if plan.keyword:
        where = []
        if filters.narrows:
            narrowed = filters.clauses(session.get_bind().dialect.name)
            where.append(Chunk.document_id.in_(select(Document.id).where(*narrowed)))
        found = keyword_chunks(
            session, collection_ids=ids, query=query, limit=plan.depth, where=where
        )
        keyword = [(hit.chunk_id, hit.score) for hit in found]
    ranking = rank(mode, vector, keyword, fusion)
    page = ranking.ranked[:k]
    rows = rag.get_chunks(session, ids=[cid for cid, _ in page])
    passages = []
    for cid, score in page:
        if cid not in rows:
            continue  # deleted since it was ranked
        chunk, document = rows[cid]
        passages.append(
            Passage(
                collection_id=chunk.collection_id,
                title=document.title,
                text=chunk.text,
                score=score,
                vector=ranking.vector.get(cid),
                keyword=ranking.keyword.get(cid),
                document_id=document.id,
                external_id=document.external_id,
                chunk_id=chunk.id,
                metadata=document.meta,
            )
        )
    return passages


def _vector_chunks(
    session: Session,
    index: VectorIndex,
    query_vector: np.ndarray,
    collection_ids: list[int],
    k: int,
    filters: DocumentFilters,
) -> list[tuple[int, float]]:
    """The k chunks closest to the query across the collections' shards: (chunk id, cosine)."""
    index.catch_up(session)
    allowed = None
    if filters.narrows:
        allowed = rag.chunk_embedding_ids_matching(
            session,
            collection_ids=collection_ids,
            model=index.model,
            filters=filters,
            limit=SUBSET_LIMIT,
        )
    chunk_of: dict[int, int] = {}

    def accept(embedding_ids: Sequence[int]) -> set[int]:
        found = rag.chunks_for_embeddings(
            session, embedding_ids=embedding_ids, collection_ids=collection_ids, filters=filters
        )
        chunk_of.update(found)
        return set(found)

    hits: list[tuple[int, float]] = []
    for collection_id in collection_ids:
        hits += index.search(query_vector, k, accept, shard=collection_id, allowed=allowed)
    hits.sort(key=lambda hit: (-hit[1], hit[0]))
    return [(chunk_of[eid], score) for eid, score in hits[:k]]


@dataclass(frozen=True)
class Retriever:
    """What an API process retrieves with: its two indexes and its query embedder."""

    chunk_index: VectorIndex
    generation_index: VectorIndex
    embed: Callable[[str], np.ndarray]
    embedding_model: str

    def collections(
        self, session: Session, *, tenant_id: int, refs: Sequence[int | str], param: str
    ) -> list[Collection]:
        """The tenant's collections by id or name; 404 naming the first one not found."""
        found = []
        for position, ref in enumerate(refs):
            collection = rag.get_collection(session, tenant_id=tenant_id, ref=ref)
            if collection is None:
                raise NotFound(f"collection {ref!r} not found", param=f"{param}[{position}]")
            found.append(collection)
        return found

    def search(
        self,
        session: Session,
        *,
        collections: Sequence[Collection],
        query: str,
        mode: str,
        k: int,
        filters: DocumentFilters,
        fusion: Fusion | None = None,
    ) -> list[Passage]:
        """retrieve() with this process's indexes; 503 while an index is being built."""
        try:
            return retrieve(
                session,
                collections=collections,
                query=query,
                mode=mode,
                k=k,
                filters=filters,
                chunk_index=self.chunk_index,
                generation_index=self.generation_index,
                embed=self.embed,
                fusion=fusion,
            )
        except IndexNotReady as exc:
            raise ServiceUnavailable(
                f"{exc}; keyword search works meanwhile", code="index_not_ready"
            ) from exc

    def ground(
        self, session: Session, *, tenant_id: int, options: dict[str, Any], question: str
    ) -> dict[str, Any]:
        """A grounded job's context: its rag options and the passages retrieved for it."""
        collections = self.collections(
            session, tenant_id=tenant_id, refs=options["collections"], param="rag.collections"
        )
        filters = options.get("filters") or {}
        passages = self.search(
            session,
            collections=collections,
            query=question,
            mode=options["mode"],
            k=options["k"],
            filters=DocumentFilters(**filters),
        )
        return grounding.context_of(passages, options)
