"""Running an export: the tenant's generations up to a snapshot, filtered, in id order, as
JSONL lines without duplicates, streamed into one file with a manifest.

The snapshot is the highest generation id when the export starts (or the one asked for):
with the manifest's format, filters, dedup options, limit and snapshot, another export
reads the same rows in the same order and writes the same bytes. Generations are read a
page at a time by id (keyset), and deduplicated DEDUP_BATCH at a time
(service/exports/dedup.py): first exact duplicates (the folded text of the line), then near
ones, by the normalised sum of the prompt's and the output's embeddings (service.db.exports
VECTOR_KINDS), so two rows are near duplicates only when both sides are alike. A row without
both embeddings of the export's embedding model is kept and counted as not_embedded.

Every row the filters select up to the last one written is counted once:
matched = skipped (not a text pair) + exact_duplicates + near_duplicates + written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import Row
from sqlalchemy.orm import Session

from service.api.schemas import ExportCreate, ExportFilters
from service.db import crud, exports
from service.db.tables import utcnow
from service.exports.dedup import NearDuplicates
from service.exports.formats import FORMAT_VERSION, Line, line_of
from service.files import FileWriter

PAGE = 2_000  # generations read per query
DEDUP_BATCH = 16_384  # rows deduplicated at once: the IVF index's lists are read per batch
EXPORT_PURPOSE = "export"
MEDIA_TYPE = "application/jsonl"
ORIGINS: dict[str, bool | None] = {"any": None, "real": False, "synthetic": True}


class ExportStopped(Exception):
    """The export was asked to stop (cancelled, or past its time limit) between pages."""


@dataclass
class Counts:
    matched: int = 0
    written: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    not_embedded: int = 0
    skipped: int = 0


def to_filters(filters: ExportFilters) -> crud.Filters:
    """The listing filters (service.db.crud) an export's filters stand for."""
    return crud.Filters(
        model=filters.model,
        tags=tuple(filters.tags),
        metadata=dict(filters.metadata),
        created_after=filters.created_after,
        created_before=filters.created_before,
        min_feedback_score=filters.min_feedback_score,
        label=filters.label,
        synthetic=ORIGINS[filters.origin],
    )


@dataclass
class _Pending:
    """A row read and not yet deduplicated against its batch."""

    line: Line | None  # None: skipped
    duplicate: bool = False  # an exact duplicate of an earlier row
    vector: np.ndarray | None = None  # the unit vector it is compared by


@dataclass
class _Page:
    """A page of rows in id order, and the vectors they are compared by: vectors[i] is
    row i's where valid[i] (never when near duplicates are kept)."""

    rows: Sequence[Row[Any]]
    vectors: np.ndarray  # (len(rows), dimension) float32, or empty
    valid: np.ndarray  # (len(rows),) bool

    @classmethod
    def without_vectors(cls, rows: Sequence[Row[Any]]) -> _Page:
        return cls(rows, np.empty((0, 0), dtype=np.float32), np.zeros(len(rows), dtype=bool))


@dataclass
class _PairReader:
    """Assembles each page's vectors on the reading thread: numpy leaves the GIL to the
    caller's thread for most of the work. The dimension is that of the first vector read;
    a row whose vectors have another is not compared."""

    dimension: int | None = None

    def page(self, rows: Sequence[Row[Any]]) -> _Page:
        valid = np.zeros(len(rows), dtype=bool)
        prompts: list[bytes] = []
        outputs: list[bytes] = []
        for position, row in enumerate(rows):
            prompt, output = row.prompt_vector, row.output_vector
            if prompt is None or output is None:
                continue
            if self.dimension is None:
                self.dimension = len(prompt) // 4
            if len(prompt) == len(output) == 4 * self.dimension:
                valid[position] = True
                prompts.append(prompt)
                outputs.append(output)
        if self.dimension is None or not prompts:
            return _Page.without_vectors(rows)
        vectors = np.zeros((len(rows), self.dimension), dtype=np.float32)
        vectors[valid] = pair_vectors(b"".join(prompts), b"".join(outputs), self.dimension)
        return _Page(rows, vectors, valid)


@dataclass
class _Exporter:
    """Turns rows into lines, drops duplicates and writes the rest, in order."""

    request: ExportCreate
    writer: FileWriter
    counts: Counts = field(default_factory=Counts)
    near: NearDuplicates | None = None
    seen: set[bytes] = field(default_factory=set)
    pending: list[_Pending] = field(default_factory=list)

    @property
    def full(self) -> bool:
        limit = self.request.limit
        return limit is not None and self.counts.written >= limit

    def add(self, page: _Page) -> None:
        for position, row in enumerate(page.rows):
            line = line_of(self.request.format, row.input, row.output)
            pending = _Pending(line)
            if line is not None:
                if self.request.dedup.exact:
                    pending.duplicate = line.key in self.seen
                    self.seen.add(line.key)
                if page.valid[position]:
                    pending.vector = page.vectors[position]
            self.pending.append(pending)
            if len(self.pending) >= DEDUP_BATCH:
                self.flush()
            if self.full:
                return

    def flush(self) -> None:
        """Deduplicate the pending rows and write those kept, up to the limit."""
        near, compared = self._near_duplicates()
        counts = self.counts
        for position, pending in enumerate(self.pending):
            if self.full:
                break
            counts.matched += 1
            if pending.line is None:
                counts.skipped += 1
            elif pending.duplicate:
                counts.exact_duplicates += 1
            elif position in near:
                counts.near_duplicates += 1
            else:
                self.writer.write(pending.line.data)
                counts.written += 1
                if self.request.dedup.near and position not in compared:
                    counts.not_embedded += 1
        self.pending.clear()

    def _near_duplicates(self) -> tuple[set[int], set[int]]:
        """(near duplicates, rows compared) among the pending rows, by position."""
        candidates = [
            (position, pending.vector)
            for position, pending in enumerate(self.pending)
            if pending.vector is not None and not pending.duplicate
        ]
        if not candidates:
            return set(), set()
        compared = [position for position, _ in candidates]
        vectors = np.stack([vector for _, vector in candidates])
        if self.near is None:
            self.near = NearDuplicates(vectors.shape[1], self.request.dedup.threshold)
        keep = self.near.keep(vectors)
        dropped = {position for position, kept in zip(compared, keep, strict=True) if not kept}
        return dropped, set(compared)


def pair_vectors(prompts: bytes, outputs: bytes, dimension: int) -> np.ndarray:
    """The unit vectors rows are compared by: the normalised sum of the unit prompt and
    output embeddings, given as the rows' float32 vectors one after another.

    Returns:
        (R, dimension) float32.
    """
    prompt = np.frombuffer(prompts, dtype="<f4").reshape(-1, dimension)
    output = np.frombuffer(outputs, dtype="<f4").reshape(-1, dimension)
    return _unit(_unit(prompt) + _unit(output))


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))[:, None]
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def _read_ahead(
    session: Session, read: Callable[[Session, str], _Page]
) -> Generator[_Page, None, None]:
    """The pages in id order, each read on a thread of its own (in a session of its own)
    while the caller works on the page before: the database, the decoding of its rows and
    the assembly of its vectors run beside the deduplication, which leaves the GIL for its
    matrix products."""
    with Session(session.get_bind()) as reader, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(read, reader, "")
        while True:
            page = pending.result()
            if len(page.rows) == PAGE:
                pending = pool.submit(read, reader, page.rows[-1].id)
            yield page
            if len(page.rows) < PAGE:
                return


def run_export(
    session: Session,
    *,
    export_id: str,
    tenant_id: int,
    request: ExportCreate,
    embedding_model: str,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Write an export's file in the session (flushed, not committed) and return its
    manifest, which is also the file's metadata.

    The file is written first, so on SQLite the transaction begins with a write and holds
    the lock to its commit (a transaction that began with a read could not take it later).

    Raises:
        ExportStopped: should_stop said so between two pages; roll the session back.
    """
    writer = FileWriter(
        session=session,
        tenant_id=tenant_id,
        purpose=EXPORT_PURPOSE,
        filename=f"{export_id}.jsonl",
        max_bytes=None,
        max_lines=None,
        media_type=MEDIA_TYPE,
    )
    taken_at = utcnow()
    until = request.snapshot or exports.latest_generation_id(session, tenant_id=tenant_id)
    exporter = _Exporter(request, writer)
    filters = to_filters(request.filters)

    pairs = _PairReader()

    def read(reader: Session, after: str) -> _Page:
        assert until is not None
        rows = exports.export_rows(
            reader,
            tenant_id=tenant_id,
            filters=filters,
            embedding_model=embedding_model if request.dedup.near else None,
            after=after,
            until=until,
            limit=PAGE,
        )
        return pairs.page(rows) if request.dedup.near else _Page.without_vectors(rows)

    if until is not None:
        with closing(_read_ahead(session, read)) as pages:
            for page in pages:
                if should_stop():
                    raise ExportStopped
                exporter.add(page)
                if exporter.full:
                    break
    exporter.flush()
    file = writer.close()
    manifest = {
        "version": FORMAT_VERSION,
        "format": request.format,
        "filters": request.filters.model_dump(mode="json"),
        "dedup": request.dedup.model_dump(mode="json"),
        "limit": request.limit,
        "snapshot": {"max_generation_id": until, "taken_at": taken_at.isoformat()},
        "counts": dataclasses.asdict(exporter.counts),
        "embedding_model": embedding_model,
        "index": exporter.near.describe() if exporter.near is not None else None,
        "file_id": file.id,
        "bytes": file.bytes,
        "lines": file.lines,
        "sha256": file.sha256,
    }
    file.meta = manifest
    session.flush()
    return manifest
