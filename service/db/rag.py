"""Collections, their documents and chunks: queries and writes (callers commit).

A document's chunks and their embeddings are written, replaced and deleted together in
the caller's transaction, and every embedding that goes is logged in
chunk_embedding_deletions so each chunk index drops it (DESIGN.md rule 3).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, Select, delete, func, select
from sqlalchemy.orm import Session

from service.db import crud
from service.db.tables import (
    Chunk,
    ChunkEmbedding,
    ChunkEmbeddingDeletion,
    Collection,
    Document,
    new_id,
    utcnow,
)

Written = Literal["created", "replaced", "unchanged"]


@dataclass(frozen=True)
class DocumentFilters:
    """Which documents a listing or a search looks at."""

    document_ids: Sequence[str] = ()
    external_ids: Sequence[str] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    created_after: datetime | None = None
    created_before: datetime | None = None

    @property
    def narrows(self) -> bool:
        return bool(
            self.document_ids
            or self.external_ids
            or self.metadata
            or self.created_after
            or self.created_before
        )

    def clauses(self, dialect: str) -> list[ColumnElement[bool]]:
        clauses: list[ColumnElement[bool]] = []
        if self.document_ids:
            clauses.append(Document.id.in_(list(self.document_ids)))
        if self.external_ids:
            clauses.append(Document.external_id.in_(list(self.external_ids)))
        if self.created_after:
            clauses.append(Document.created_at >= self.created_after)
        if self.created_before:
            clauses.append(Document.created_at < self.created_before)
        clauses.extend(
            crud.json_value_matches(Document.meta, key, value, dialect)
            for key, value in self.metadata.items()
        )
        return clauses


@dataclass(frozen=True)
class NewChunk:
    """A chunk to store: its place in the document and its embedding."""

    text: str
    start: int
    end: int
    tokens: int
    vector: bytes


def content_sha256(title: str, text: str, metadata: dict[str, Any]) -> str:
    """What makes two uploads of a document the same: its title, text and metadata."""
    canonical = json.dumps([title, text, metadata], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


# --- collections -------------------------------------------------------------------------


def create_collection(
    session: Session,
    *,
    tenant_id: int,
    name: str,
    kind: str,
    embedding_model: str,
    chunk_tokens: int,
    chunk_overlap: int,
    metadata: dict[str, Any],
) -> Collection:
    """Add a collection (flushed); IntegrityError when the tenant has one of that name."""
    collection = Collection(
        tenant_id=tenant_id,
        name=name,
        kind=kind,
        embedding_model=embedding_model,
        chunk_tokens=chunk_tokens,
        chunk_overlap=chunk_overlap,
        meta=metadata,
    )
    session.add(collection)
    session.flush()
    return collection


def get_collection(session: Session, *, tenant_id: int, ref: int | str) -> Collection | None:
    """The tenant's collection by id, or by name when ref is not an integer."""
    where = (
        Collection.id == int(ref)
        if isinstance(ref, int) or ref.isdigit()
        else Collection.name == ref
    )
    return session.scalar(select(Collection).where(Collection.tenant_id == tenant_id, where))


@dataclass(frozen=True)
class CollectionCounts:
    documents: int = 0
    chunks: int = 0


def collection_counts(session: Session, *, ids: Sequence[int]) -> dict[int, CollectionCounts]:
    documents = dict(
        session.execute(
            select(Document.collection_id, func.count())
            .where(Document.collection_id.in_(list(ids)))
            .group_by(Document.collection_id)
        ).all()
    )
    chunks = dict(
        session.execute(
            select(Chunk.collection_id, func.count())
            .where(Chunk.collection_id.in_(list(ids)))
            .group_by(Chunk.collection_id)
        ).all()
    )
    return {cid: CollectionCounts(documents.get(cid, 0), chunks.get(cid, 0)) for cid in ids}


def list_collections(session: Session, *, tenant_id: int) -> list[Collection]:
    return list(
        session.scalars(
            select(Collection).where(Collection.tenant_id == tenant_id).order_by(Collection.id)
        )
    )


def delete_collection(session: Session, *, collection: Collection) -> None:
    """Delete a collection with its documents, chunks and embeddings (logged)."""
    _log_deletions(
        session,
        select(ChunkEmbedding.id, ChunkEmbedding.model, ChunkEmbedding.collection_id).where(
            ChunkEmbedding.collection_id == collection.id
        ),
    )
    session.execute(delete(ChunkEmbedding).where(ChunkEmbedding.collection_id == collection.id))
    session.execute(delete(Chunk).where(Chunk.collection_id == collection.id))
    session.execute(delete(Document).where(Document.collection_id == collection.id))
    session.delete(collection)
    session.flush()


# --- documents ---------------------------------------------------------------------------


def get_document(session: Session, *, collection_id: int, document_id: str) -> Document | None:
    return session.scalar(
        select(Document).where(Document.collection_id == collection_id, Document.id == document_id)
    )


def list_documents(
    session: Session,
    *,
    collection_id: int,
    filters: DocumentFilters,
    after: str | None,
    limit: int,
    descending: bool = True,
) -> tuple[list[Document], bool]:
    query = select(Document).where(
        Document.collection_id == collection_id, *filters.clauses(session.get_bind().dialect.name)
    )
    return crud.page_by_id(
        session, query, Document, after=after, limit=limit, descending=descending
    )


def delete_document(session: Session, *, document: Document) -> None:
    """Delete a document with its chunks and their embeddings (logged)."""
    _drop_chunks(session, document_id=document.id)
    session.delete(document)
    session.flush()


def write_document(
    session: Session,
    *,
    collection: Collection,
    external_id: str,
    title: str,
    text: str,
    metadata: dict[str, Any],
    fmt: str,
    filename: str | None,
    chunks: Sequence[NewChunk],
    job_id: str | None,
) -> tuple[Document, Written]:
    """Store a document and its chunks, replacing the chunks of an earlier version with
    the same external id in the same transaction; the same content again changes nothing.
    """
    sha256 = content_sha256(title, text, metadata)
    document = session.scalar(
        select(Document)
        .where(Document.collection_id == collection.id, Document.external_id == external_id)
        .with_for_update()
    )
    if document is not None and document.sha256 == sha256:
        return document, "unchanged"
    written: Written = "created"
    if document is None:
        document = Document(
            id=new_id("doc"),
            tenant_id=collection.tenant_id,
            collection_id=collection.id,
            external_id=external_id,
        )
        session.add(document)
    else:
        _drop_chunks(session, document_id=document.id)
        written = "replaced"
    document.title = title
    document.text = text
    document.meta = metadata
    document.format = fmt
    document.filename = filename
    document.sha256 = sha256
    document.chunk_count = len(chunks)
    document.job_id = job_id
    document.updated_at = utcnow()
    session.flush()
    rows = [
        Chunk(
            tenant_id=collection.tenant_id,
            collection_id=collection.id,
            document_id=document.id,
            seq=seq,
            text=chunk.text,
            start=chunk.start,
            end=chunk.end,
            tokens=chunk.tokens,
        )
        for seq, chunk in enumerate(chunks)
    ]
    session.add_all(rows)
    session.flush()
    dimension = len(chunks[0].vector) // 4 if chunks else 0
    session.add_all(
        ChunkEmbedding(
            collection_id=collection.id,
            chunk_id=row.id,
            model=collection.embedding_model,
            dimension=dimension,
            vector=chunk.vector,
        )
        for row, chunk in zip(rows, chunks, strict=True)
    )
    session.flush()
    return document, written


def known_digests(session: Session, *, collection_id: int) -> dict[str, str]:
    """external id -> sha256 of the collection's documents, to skip unchanged ones early."""
    rows = session.execute(
        select(Document.external_id, Document.sha256).where(Document.collection_id == collection_id)
    )
    return dict(rows.tuples().all())


def _drop_chunks(session: Session, *, document_id: str) -> None:
    chunk_ids = select(Chunk.id).where(Chunk.document_id == document_id)
    _log_deletions(
        session,
        select(ChunkEmbedding.id, ChunkEmbedding.model, ChunkEmbedding.collection_id).where(
            ChunkEmbedding.chunk_id.in_(chunk_ids)
        ),
    )
    session.execute(delete(ChunkEmbedding).where(ChunkEmbedding.chunk_id.in_(chunk_ids)))
    session.execute(delete(Chunk).where(Chunk.document_id == document_id))


def _log_deletions(session: Session, embeddings: Select[int, str, int]) -> None:
    session.add_all(
        ChunkEmbeddingDeletion(embedding_id=eid, model=model, collection_id=collection_id)
        for eid, model, collection_id in session.execute(embeddings)
    )
    session.flush()


# --- search ------------------------------------------------------------------------------


def _visible_chunk_embeddings(
    session: Session, *columns: Any, collection_ids: Sequence[int], filters: DocumentFilters
) -> Select[Any]:
    query = select(*columns).join(Chunk, Chunk.id == ChunkEmbedding.chunk_id)
    if filters.narrows:
        narrowed = filters.clauses(session.get_bind().dialect.name)
        query = query.join(Document, Document.id == Chunk.document_id).where(*narrowed)
    return query.where(ChunkEmbedding.collection_id.in_(list(collection_ids)))


def chunks_for_embeddings(
    session: Session,
    *,
    embedding_ids: Sequence[int],
    collection_ids: Sequence[int],
    filters: DocumentFilters,
) -> dict[int, int]:
    """Of the given chunk-embedding ids, those in the collections whose document passes
    filters: embedding id -> chunk id."""
    query = _visible_chunk_embeddings(
        session,
        ChunkEmbedding.id,
        ChunkEmbedding.chunk_id,
        collection_ids=collection_ids,
        filters=filters,
    ).where(ChunkEmbedding.id.in_(list(embedding_ids)))
    return dict(session.execute(query).tuples().all())


def chunk_embedding_ids_matching(
    session: Session,
    *,
    collection_ids: Sequence[int],
    model: str,
    filters: DocumentFilters,
    limit: int,
) -> list[int] | None:
    """Ids of the chunk embeddings whose document passes filters; None if over limit."""
    query = (
        _visible_chunk_embeddings(
            session, ChunkEmbedding.id, collection_ids=collection_ids, filters=filters
        )
        .where(ChunkEmbedding.model == model)
        .limit(limit + 1)
    )
    ids = list(session.scalars(query))
    return ids if len(ids) <= limit else None


def get_chunks(session: Session, *, ids: Sequence[int]) -> dict[int, tuple[Chunk, Document]]:
    rows = session.execute(
        select(Chunk, Document)
        .join(Document, Document.id == Chunk.document_id)
        .where(Chunk.id.in_(list(ids)))
    )
    return {chunk.id: (chunk, document) for chunk, document in rows.tuples()}
