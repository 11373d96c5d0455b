"""Ingestion: a job that turns uploaded files and documents into searchable chunks.

Extract the text of each file (service/rag/extract.py), cut it into token-aware chunks
(service/rag/chunking.py), embed the chunks in batches on the engine thread (between the
decoding steps of generations), and store each document with its chunks and embeddings in
one transaction; every API process's chunk index follows the table (DESIGN.md rule 3).

A document whose content is unchanged is skipped before it is chunked, so a redelivered
job resumes where the last attempt stopped. Progress is written to the job's result as
it goes; the staged upload files are deleted when the job succeeds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service import files
from service.db import crud, rag
from service.db.tables import Collection, File, Job
from service.rag.chunking import ChunkSettings, chunk_text, title_prefix
from service.rag.extract import Extracted, ExtractionError, detect_format, extract
from workers.engine.runtime import ModelRuntime
from workers.leases import LeaseKeeper

logger = logging.getLogger("genserve.worker")

EMBED_BATCH = 128  # chunks per call on the engine thread: generations step between calls
STORE_EVERY = 64  # documents embedded together; progress is written after each batch
MAX_TITLE_PREFIX_TOKENS = 48  # a longer title is not repeated in each chunk's embedding
MAX_ERRORS = 100  # errors kept in the progress report


@dataclass
class _Pending:
    """A document chunked and waiting for its embeddings."""

    document: Extracted
    fmt: str
    filename: str | None
    chunks: list[Any]
    texts: list[str]  # what is embedded: the title, then the chunk


def run_ingestion(
    factory: sessionmaker[Session],
    runtime: ModelRuntime,
    job: Job,
    *,
    leases: LeaseKeeper,
    time_limit_s: float,
) -> str:
    """Run a claimed ingestion job to its end; returns its final status."""
    cancelled = leases.watch(job.id)
    try:
        return _ingest(factory, runtime, job, cancelled=cancelled, time_limit_s=time_limit_s)
    finally:
        leases.release(job.id)


def _ingest(
    factory: sessionmaker[Session],
    runtime: ModelRuntime,
    job: Job,
    *,
    cancelled: Any,
    time_limit_s: float,
) -> str:
    deadline = time.monotonic() + time_limit_s
    with factory() as session:
        collection = session.get(Collection, job.input["collection_id"])
        if collection is not None:
            session.expunge(collection)
    if collection is None:
        return _finish(factory, job, "failed", error="the collection was deleted")
    embedder = runtime.embedder(collection.embedding_model)
    settings = ChunkSettings(
        max_tokens=min(collection.chunk_tokens, embedder.max_tokens - 2),
        overlap_tokens=collection.chunk_overlap,
    )
    progress: dict[str, Any] = {
        "stage": "extract",
        "files": {"total": len(job.input.get("files", [])), "done": 0},
        "documents": {
            "total": 0,
            "done": 0,
            "created": 0,
            "replaced": 0,
            "unchanged": 0,
            "failed": 0,
        },
        "chunks": 0,
        "errors": [],
    }
    documents = list(_extracted(factory, job, progress))
    counts = progress["documents"]
    counts["total"] = len(documents)
    progress["stage"] = "embed"
    _report(factory, job, progress)
    with factory() as session:
        known = rag.known_digests(session, collection_id=collection.id)
    batch: list[_Pending] = []
    for document, fmt, filename in documents:
        if cancelled.is_set():
            return _finish(factory, job, "cancelled", progress=progress)
        if time.monotonic() > deadline:
            return _finish(
                factory,
                job,
                "failed",
                progress=progress,
                error=f"the job ran past its time limit of {time_limit_s:g} s",
            )
        digest = rag.content_sha256(document.title, document.text, document.metadata)
        if known.get(document.external_id) == digest:
            counts["unchanged"] += 1
            counts["done"] += 1
            continue
        batch.append(_chunked(embedder, document, fmt, filename, settings))
        if len(batch) >= STORE_EVERY:
            _store(factory, runtime, collection, job, batch, progress)
            batch = []
    _store(factory, runtime, collection, job, batch, progress)
    progress["stage"] = "done"
    status = _finish(factory, job, "succeeded", progress=progress)
    if status == "succeeded":
        with factory() as session:
            for file_id in job.input.get("files", []):
                staged = session.get(File, file_id)
                if staged is not None:
                    files.delete_file(session, file=staged)
            session.commit()
    return status


def _extracted(
    factory: sessionmaker[Session], job: Job, progress: dict[str, Any]
) -> Iterator[tuple[Extracted, str, str | None]]:
    """Every document of the job: its files' in upload order, then those sent as JSON."""
    for file_id in job.input.get("files", []):
        with factory() as session:
            staged = session.get(File, file_id)
            if staged is None:
                _error(progress, f"file {file_id} is gone", file=file_id)
                continue
            data = b"".join(files.iter_chunks(session, file_id))
            filename, media_type = staged.filename, staged.media_type
        try:
            fmt = detect_format(filename, media_type, data)
            found = extract(data, filename=filename, media_type=media_type, fmt=fmt)
        except ExtractionError as exc:
            _error(progress, str(exc), file=filename)
            progress["documents"]["failed"] += 1
            found = []
        progress["files"]["done"] += 1
        for document in found:
            yield document, fmt, filename
    for item in job.input.get("documents", []):
        yield (
            Extracted(
                external_id=item["id"],
                title=item.get("title", ""),
                text=item["text"],
                metadata=item.get("metadata", {}),
            ),
            "json",
            None,
        )


def _chunked(
    embedder: Any, document: Extracted, fmt: str, filename: str | None, settings: ChunkSettings
) -> _Pending:
    """The document's chunks, and their texts to embed: each after the document's title
    (title_prefix) when the title is short enough to leave the chunk its room."""
    prefix = title_prefix(document.title)
    prefix_tokens = len(embedder.token_spans(prefix)) if prefix else 0
    room = settings.max_tokens - max(2 * settings.overlap_tokens + 1, 8)
    if prefix_tokens > min(room, MAX_TITLE_PREFIX_TOKENS):
        prefix, prefix_tokens = "", 0
    chunks = chunk_text(document.text, embedder.token_spans, settings, prefix_tokens=prefix_tokens)
    return _Pending(document, fmt, filename, chunks, [prefix + chunk.text for chunk in chunks])


def _store(
    factory: sessionmaker[Session],
    runtime: ModelRuntime,
    collection: Collection,
    job: Job,
    batch: list[_Pending],
    progress: dict[str, Any],
) -> None:
    """Embed the batch's chunks, then write its documents, each in its own transaction."""
    if not batch:
        return
    texts = [text for pending in batch for text in pending.texts]
    vectors = np.zeros((0, 0), dtype=np.float32)
    if texts:
        parts = [
            runtime.embed(collection.embedding_model, texts[start : start + EMBED_BATCH])
            for start in range(0, len(texts), EMBED_BATCH)
        ]
        vectors = np.concatenate(parts).astype("<f4", copy=False)
    counts = progress["documents"]
    offset = 0
    for pending in batch:
        own = vectors[offset : offset + len(pending.chunks)]
        offset += len(pending.chunks)
        new = [
            rag.NewChunk(
                text=chunk.text,
                start=chunk.start,
                end=chunk.end,
                tokens=chunk.tokens,
                vector=vector.tobytes(),
            )
            for chunk, vector in zip(pending.chunks, own, strict=True)
        ]
        written = _write(factory, collection, job, pending, new, progress)
        counts[written] += 1
        counts["done"] += 1
        if written != "unchanged":
            progress["chunks"] += len(new)
    _report(factory, job, progress)


def _write(
    factory: sessionmaker[Session],
    collection: Collection,
    job: Job,
    pending: _Pending,
    chunks: list[rag.NewChunk],
    progress: dict[str, Any],
) -> rag.Written:
    """One document in its own transaction (on SQLite a write transaction that began with a
    read could not wait for the lock: each is short and starts with its first write)."""
    document = pending.document
    with factory() as session:
        try:
            _, written = rag.write_document(
                session,
                collection=collection,
                external_id=document.external_id,
                title=document.title,
                text=document.text,
                metadata=document.metadata,
                fmt=pending.fmt,
                filename=pending.filename,
                chunks=chunks,
                job_id=job.id,
            )
            session.commit()
        except IntegrityError:
            # Another ingestion wrote this document meanwhile; its version stands.
            session.rollback()
            _error(progress, "written meanwhile by another ingestion", document=document)
            written = "unchanged"
    return written


def _error(progress: dict[str, Any], message: str, **where: Any) -> None:
    if len(progress["errors"]) < MAX_ERRORS:
        located = {
            key: value.external_id if isinstance(value, Extracted) else value
            for key, value in where.items()
        }
        progress["errors"].append({"message": message, **located})


def _report(factory: sessionmaker[Session], job: Job, progress: dict[str, Any]) -> None:
    with factory() as session:
        session.execute(
            update(Job).where(Job.id == job.id, Job.status == "running").values(result=progress)
        )
        session.commit()


def _finish(
    factory: sessionmaker[Session],
    job: Job,
    status: str,
    *,
    progress: dict[str, Any] | None = None,
    error: str | None = None,
) -> str:
    with factory() as session:
        finished = crud.finish_job(
            session, job_id=job.id, status=status, error=error, result=progress
        )
        session.commit()
    return status if finished else "skipped"
