"""The FAISS index of one embedding model, kept caught up from SQL (DESIGN.md rule 3).

SQL is the truth and the index file a cache of it: a process that searches reads the
embedding rows above the last id it saw and the deletion log the writers append to,
persists the index atomically beside a manifest, and rebuilds from SQL when the file is
missing, corrupt or made for another model.

Ids are taken when a row is inserted but become visible when its transaction commits, so
with several writers on PostgreSQL a lower id can appear after a higher one was read. The
ids a recent row skipped over are kept as gaps and looked up again on each catch-up until
they appear, are logged as deleted, or `settle_s` passes (a rolled-back insert never
appears). The manifest's last ids stop below the oldest open gap, so a restart reads the
rows above them again.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from service.db.tables import Embedding, EmbeddingDeletion

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_TYPE = "IDMap2,FlatIP"
READ_CHUNK = 10_000  # rows per SQL read
IN_CHUNK = 1_000  # ids per IN (...) list
MIN_FETCH = 32  # a filtered search fetches max(WIDEN * k, MIN_FETCH) candidates first
WIDEN = 4
MAX_GAP_RUN = 1_000  # skipped ids tracked below one row: in-flight inserts are recent ones
MAX_GAPS = 100_000
MAX_ID = 2**63 - 1

Accept = Callable[[Sequence[int]], set[int]]


@dataclass(frozen=True)
class Manifest:
    """The JSON file beside an index file: what the index holds and how far it has read."""

    model: str
    dimension: int
    index_type: str
    last_id: int  # the index file reflects every embedding row up to this id
    last_deletion_id: int  # every deletion-log row up to this one is applied
    count: int
    checksum: str  # sha256 of the index file bytes
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse a manifest; ValueError or TypeError when it is not one."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("manifest is not a JSON object")
        manifest = cls(**data)
        for spec in dataclasses.fields(cls):
            value = getattr(manifest, spec.name)
            expected = str if spec.type == "str" else int
            if not isinstance(value, expected) or isinstance(value, bool):
                raise ValueError(f"manifest field {spec.name} is {value!r}")
        return manifest


class _Unusable(Exception):
    """The persisted index cannot be used; the message says why."""


def _new_index(dimension: int) -> faiss.Index:
    """Exact inner-product search (cosine on normalised vectors), keyed by SQL row id."""
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))


def _file_stem(model: str) -> str:
    """A filename-safe stem; the hash keeps apart names that differ only in unsafe chars."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("._")[:64] or "model"
    return f"{slug}-{hashlib.sha256(model.encode()).hexdigest()[:12]}"


def _aware(stamp: datetime) -> datetime:
    # SQLite hands timestamps back without a zone; they were written in UTC.
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def _chunks(ids: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


@dataclass
class _Cursor:
    """How far an id-ordered table was read, and skipped ids that may still commit."""

    last_id: int = 0
    gaps: dict[int, float] = field(default_factory=dict)  # skipped id -> monotonic expiry

    @property
    def watermark(self) -> int:
        """The highest id at or below which every row has been seen."""
        return min(self.gaps, default=self.last_id + 1) - 1

    def advance(self, row_id: int, stamp: datetime, settle_s: float) -> None:
        # Only a recent row can have been overtaken by a transaction that is still open.
        recent = _aware(stamp) >= datetime.now(UTC) - timedelta(seconds=settle_s)
        if row_id > self.last_id + 1 and recent:
            start = max(self.last_id + 1, row_id - MAX_GAP_RUN)
            self.gaps.update(dict.fromkeys(range(start, row_id), time.monotonic() + settle_s))
        self.last_id = max(self.last_id, row_id)

    def settle(self, ids: Iterable[int]) -> None:
        for row_id in ids:
            self.gaps.pop(row_id, None)

    def expire(self) -> None:
        now = time.monotonic()
        self.gaps = {row_id: until for row_id, until in self.gaps.items() if until > now}
        if len(self.gaps) > MAX_GAPS:
            logger.warning("%d ids pending; forgetting the oldest", len(self.gaps))
            self.gaps = dict(sorted(self.gaps.items())[-MAX_GAPS:])


def _vector_of(model: str) -> Any:
    # Rows of every model are read (ids only for the others) so that a missing id is a gap.
    return case((Embedding.model == model, Embedding.vector), else_=None)


def _rows_after(session: Session, model: str, after: int) -> Sequence[Any]:
    """(id, created_at, vector or None) of the next rows of any model above `after`."""
    stmt = (
        select(Embedding.id, Embedding.created_at, _vector_of(model))
        .where(Embedding.id > after)
        .order_by(Embedding.id)
        .limit(READ_CHUNK)
    )
    return session.execute(stmt).all()


def _rows_by_ids(session: Session, model: str, ids: Collection[int]) -> list[Any]:
    """(id, vector or None) of the rows that exist among ids."""
    found: list[Any] = []
    for chunk in _chunks(sorted(ids), IN_CHUNK):
        stmt = select(Embedding.id, _vector_of(model)).where(Embedding.id.in_(chunk))
        found.extend(session.execute(stmt).all())
    return found


_DELETION_COLUMNS = (
    EmbeddingDeletion.id,
    EmbeddingDeletion.embedding_id,
    EmbeddingDeletion.model,
    EmbeddingDeletion.deleted_at,
)


def _deletions_after(session: Session, after: int) -> Sequence[Any]:
    stmt = (
        select(*_DELETION_COLUMNS)
        .where(EmbeddingDeletion.id > after)
        .order_by(EmbeddingDeletion.id)
        .limit(READ_CHUNK)
    )
    return session.execute(stmt).all()


def _deletions_by_ids(session: Session, ids: Collection[int]) -> list[Any]:
    found: list[Any] = []
    for chunk in _chunks(sorted(ids), IN_CHUNK):
        stmt = select(*_DELETION_COLUMNS).where(EmbeddingDeletion.id.in_(chunk))
        found.extend(session.execute(stmt).all())
    return found


@contextmanager
def _file_lock(path: Path, mode: int) -> Iterator[None]:
    """An fcntl lock on path (LOCK_SH or LOCK_EX), between processes and threads alike."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), mode)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _sha256_and_sync(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
        os.fsync(handle.fileno())
    return digest.hexdigest()


def _write_atomic(path: Path, write: Callable[[Path], object]) -> str:
    """Write a temp file beside path, fsync it, rename it over path; returns its sha256."""
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temp = Path(name)
    try:
        write(temp)
        checksum = _sha256_and_sync(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # makes the rename itself durable
    finally:
        os.close(directory)
    return checksum


def _remove_ids(index: faiss.Index, ids: Sequence[int]) -> int:
    if not ids:
        return 0
    batch = np.ascontiguousarray(ids, dtype=np.int64)
    return int(index.remove_ids(faiss.IDSelectorBatch(batch.size, faiss.swig_ptr(batch))))


def _ranked(hits: Iterable[tuple[int, float]]) -> list[tuple[int, float]]:
    return sorted(hits, key=lambda hit: (-hit[1], hit[0]))


class VectorIndex:
    """The FAISS index of one embedding model, kept caught up from SQL.

    Thread-safe: searches run alongside catch-ups; FAISS add/remove and search take
    one lock, and one catch-up or persist runs at a time.
    """

    def __init__(
        self,
        *,
        model: str,
        dimension: int,
        directory: Path,
        persist_every: int = 1000,
        settle_s: float = 300.0,
    ) -> None:
        if dimension < 1:
            raise ValueError(f"dimension must be >= 1, got {dimension}")
        if persist_every < 1:
            raise ValueError(f"persist_every must be >= 1, got {persist_every}")
        if settle_s < 0:
            raise ValueError(f"settle_s must be >= 0, got {settle_s}")
        self.model = model
        self.dimension = dimension
        self.directory = Path(directory)
        self.persist_every = persist_every
        self.settle_s = settle_s
        stem = _file_stem(model)
        self.index_path = self.directory / f"{stem}.faiss"
        self.manifest_path = self.directory / f"{stem}.manifest.json"
        self.lock_path = self.directory / f"{stem}.lock"
        self.rebuilt = False  # set by open(): True when the index was built from SQL
        self.rebuild_reason: str | None = None
        self._index = _new_index(dimension)
        self._rows = _Cursor()
        self._deletions = _Cursor()
        self._unpersisted = 0
        self._index_lock = threading.RLock()  # FAISS: no search during add or remove
        self._sync_lock = threading.RLock()  # one catch-up or persist at a time

    @property
    def ntotal(self) -> int:
        with self._index_lock:
            return int(self._index.ntotal)

    @property
    def last_id(self) -> int:
        """The highest embedding id (of any model) read so far."""
        return self._rows.last_id

    def open(self, session: Session) -> None:
        """Load the persisted index if it is sound, else rebuild it from SQL; then catch up."""
        with self._sync_lock:
            self.rebuild_reason = self._load()
            self.rebuilt = self.rebuild_reason is not None
            if not self.rebuilt:
                self.catch_up(session)
                return
            started = time.perf_counter()
            self._reset(session)
            self._sync(session)
            self.persist()
            logger.info(
                "built index %s from SQL: %d vectors in %.2fs",
                self.model,
                self.ntotal,
                time.perf_counter() - started,
            )

    def catch_up(self, session: Session) -> int:
        """Index new rows of this model and drop deleted ones; returns rows added + removed.

        Reads through session and leaves its transaction to the caller.
        """
        with self._sync_lock:
            changes = self._sync(session)
            if self._unpersisted >= self.persist_every:
                self.persist()
            return changes

    def search(self, query: np.ndarray, k: int, accept: Accept) -> list[tuple[int, float]]:
        """The top-k (id, score) by inner product among the ids that accept approves.

        accept gets candidate ids (each once per search) and returns those the caller
        allows (its tenant, its SQL filters, rows that still exist). Candidates are
        fetched in widening rounds until k are accepted or the whole index was searched.
        Results are ordered by score, then id.
        """
        matrix = self._query_matrix(query, k)
        verdicts: dict[int, bool] = {}
        fetch = max(WIDEN * k, MIN_FETCH)
        while True:
            with self._index_lock:
                total = int(self._index.ntotal)
                fetch = min(fetch, total)
                if fetch == 0:
                    return []
                scores, ids = self._index.search(matrix, fetch)
            hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
            fresh = [row_id for row_id, _ in hits if row_id not in verdicts]
            if fresh:
                approved = accept(fresh)
                verdicts.update((row_id, row_id in approved) for row_id in fresh)
            accepted = _ranked(hit for hit in hits if verdicts[hit[0]])
            # Done once the k-th accepted hit scores above everything not fetched yet.
            if fetch >= total or (len(accepted) >= k and hits[-1][1] < accepted[k - 1][1]):
                return accepted[:k]
            fetch *= WIDEN

    def persist(self) -> None:
        """Write the index, then its manifest, each atomically, under the file lock."""
        with self._sync_lock:
            # Holding the sync lock keeps add/remove away; searches may read meanwhile.
            self.directory.mkdir(parents=True, exist_ok=True)
            with _file_lock(self.lock_path, fcntl.LOCK_EX):
                checksum = _write_atomic(
                    self.index_path, lambda path: faiss.write_index(self._index, str(path))
                )
                manifest = Manifest(
                    model=self.model,
                    dimension=self.dimension,
                    index_type=INDEX_TYPE,
                    last_id=self._rows.watermark,
                    last_deletion_id=self._deletions.watermark,
                    count=int(self._index.ntotal),
                    checksum=checksum,
                )
                _write_atomic(self.manifest_path, lambda path: path.write_text(manifest.to_json()))
            self._unpersisted = 0

    def _query_matrix(self, query: np.ndarray, k: int) -> np.ndarray:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        matrix = np.asarray(query, dtype=np.float32)
        if matrix.ndim == 1:
            matrix = matrix[np.newaxis, :]
        if matrix.shape != (1, self.dimension):
            raise ValueError(
                f"query shape {np.shape(query)} does not fit dimension {self.dimension}: "
                f"expected ({self.dimension},) or (1, {self.dimension})"
            )
        return np.ascontiguousarray(matrix)

    def _load(self) -> str | None:
        """Load the persisted index; None when loaded, else why it must be rebuilt."""
        if not (self.index_path.exists() and self.manifest_path.exists()):
            logger.info("no persisted index for %s in %s; building it", self.model, self.directory)
            return "missing"
        try:
            index, manifest = self._read_persisted()
        except _Unusable as exc:
            reason = str(exc)
            logger.warning(
                "persisted index for %s is unusable (%s); rebuilding", self.model, reason
            )
            return reason
        # Rows above the manifest's last id may have been joined by late ones: read them again.
        index.remove_ids(faiss.IDSelectorRange(manifest.last_id + 1, MAX_ID))
        with self._index_lock:
            self._index = index
        self._rows = _Cursor(last_id=manifest.last_id)
        self._deletions = _Cursor(last_id=manifest.last_deletion_id)
        self._unpersisted = 0
        logger.info("loaded index %s: %d vectors", self.model, index.ntotal)
        return None

    def _read_persisted(self) -> tuple[faiss.Index, Manifest]:
        with _file_lock(self.lock_path, fcntl.LOCK_SH):
            try:
                manifest = Manifest.from_json(self.manifest_path.read_text())
            except (OSError, ValueError, TypeError) as exc:
                raise _Unusable(f"bad manifest: {exc}") from exc
            self._check_manifest(manifest)
            try:
                if _sha256_and_sync(self.index_path) != manifest.checksum:
                    raise _Unusable("index file checksum does not match the manifest")
                index = faiss.read_index(str(self.index_path))
            except (OSError, RuntimeError) as exc:
                raise _Unusable(f"unreadable index file: {exc}") from exc
        if index.d != self.dimension or index.ntotal != manifest.count:
            raise _Unusable(f"index file holds {index.ntotal} x {index.d}, not as in manifest")
        return index, manifest

    def _check_manifest(self, manifest: Manifest) -> None:
        expected = (FORMAT_VERSION, self.model, self.dimension, INDEX_TYPE)
        found = (manifest.format_version, manifest.model, manifest.dimension, manifest.index_type)
        if found != expected:
            raise _Unusable(f"manifest is for (format, model, dimension, type) {found}")

    def _reset(self, session: Session) -> None:
        """Start from an empty index. Rows are read from the start; of the deletion log only
        the tail, whose in-flight entries may delete rows the build still reads."""
        newest = session.execute(select(func.max(EmbeddingDeletion.id))).scalar() or 0
        with self._index_lock:
            self._index = _new_index(self.dimension)
        self._rows = _Cursor()
        self._deletions = _Cursor(last_id=max(0, newest - MAX_GAP_RUN))
        self._unpersisted = 0

    def _sync(self, session: Session) -> int:
        changes = self._add_new_rows(session) + self._fill_row_gaps(session)
        changes += self._apply_deletions(session)
        self._rows.expire()
        self._deletions.expire()
        self._unpersisted += changes
        return changes

    def _add_new_rows(self, session: Session) -> int:
        added = 0
        while rows := _rows_after(session, self.model, self._rows.last_id):
            for row_id, created_at, _ in rows:
                self._rows.advance(row_id, created_at, self.settle_s)
            added += self._apply(add=[(row[0], row[2]) for row in rows if row[2] is not None])
            if len(rows) < READ_CHUNK:
                break
        return added

    def _fill_row_gaps(self, session: Session) -> int:
        if not self._rows.gaps:
            return 0
        found = _rows_by_ids(session, self.model, list(self._rows.gaps))
        self._rows.settle(row_id for row_id, _ in found)
        late = [(row_id, vector) for row_id, vector in found if vector is not None]
        if late:
            logger.info("index %s: %d rows committed after higher ids", self.model, len(late))
        return self._apply(add=late, remove=[row_id for row_id, _ in late])

    def _apply_deletions(self, session: Session) -> int:
        logged = self._read_deletions(session)
        if not logged:
            return 0
        self._rows.settle(embedding_id for embedding_id, _ in logged)
        deleted = {embedding_id for embedding_id, model in logged if model == self.model}
        if not deleted:
            return 0
        # The table, not the log, says what exists now: SQLite can hand a deleted row's id
        # to the next insert, so a logged id may belong to a live row again.
        live = [
            (row_id, vector)
            for row_id, vector in _rows_by_ids(session, self.model, deleted)
            if vector is not None and row_id <= self._rows.last_id
        ]
        return self._apply(add=live, remove=sorted(deleted))

    def _read_deletions(self, session: Session) -> list[tuple[int, str]]:
        """(embedding_id, model) of deletion-log rows not applied yet."""
        rows: list[Any] = []
        while chunk := _deletions_after(session, self._deletions.last_id):
            for log_id, _, _, deleted_at in chunk:
                self._deletions.advance(log_id, deleted_at, self.settle_s)
            rows.extend(chunk)
            if len(chunk) < READ_CHUNK:
                break
        if self._deletions.gaps:
            late = _deletions_by_ids(session, list(self._deletions.gaps))
            self._deletions.settle(row[0] for row in late)
            rows.extend(late)
        return [(row[1], row[2]) for row in rows]

    def _apply(self, *, add: Sequence[tuple[int, bytes]], remove: Sequence[int] = ()) -> int:
        """Remove ids, then add rows, as one step for searches; returns the count changed."""
        ids, vectors = self._decode(add)
        if not remove and not ids.size:
            return 0
        with self._index_lock:
            removed = _remove_ids(self._index, remove)
            if ids.size:
                self._index.add_with_ids(vectors, ids)
        return removed + int(ids.size)

    def _decode(self, rows: Sequence[tuple[int, bytes]]) -> tuple[np.ndarray, np.ndarray]:
        width = 4 * self.dimension
        good = [(row_id, blob) for row_id, blob in rows if len(blob) == width]
        if len(good) < len(rows):
            bad = sorted({row_id for row_id, _ in rows} - {row_id for row_id, _ in good})
            logger.warning(
                "index %s: skipped %d rows whose vector is not %d float32 (ids %s...)",
                self.model,
                len(bad),
                self.dimension,
                bad[:5],
            )
        ids = np.fromiter((row_id for row_id, _ in good), dtype=np.int64, count=len(good))
        vectors = np.frombuffer(b"".join(blob for _, blob in good), dtype=np.float32)
        return ids, vectors.reshape(len(good), self.dimension)
