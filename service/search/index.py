"""The FAISS index of one embedding model, kept caught up from SQL (DESIGN.md rule 3).

SQL is the truth and the index files a cache of it. A process that searches reads the
embedding rows above the last id it saw and the deletion log the writers append to; one
process (the holder of the writer lock) persists the index atomically with a manifest,
the others load it; a missing, corrupt or mismatched index is rebuilt from SQL.

The same machinery follows two sources (`Source`): the embeddings of past generations,
sharded by tenant, and the embeddings of documents' chunks, sharded by collection.

The index is sharded by tenant (service/search/shards.py): a search only ever looks at
its tenant's shard, each shard is exact while small and an IVF index once large, and a
large shard is retrained in the background from a copy while the old one keeps serving.

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
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import faiss
import numpy as np
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from service.db.tables import ChunkEmbedding, ChunkEmbeddingDeletion, Embedding, EmbeddingDeletion
from service.search.shards import Shard, ShardPolicy, build

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
INDEX_TYPE = "tenant-shards"
READ_CHUNK = 10_000  # rows per SQL read
IN_CHUNK = 1_000  # ids per IN (...) list
MIN_FETCH = 32  # a filtered search fetches max(WIDEN * k, MIN_FETCH) candidates first
WIDEN = 4
MAX_GAP_RUN = 1_000  # skipped ids tracked below one row: in-flight inserts are recent ones
MAX_GAPS = 100_000
PERSIST_FRACTION = 0.05  # a large index is written once this share of it has changed
PERSIST_INTERVAL_S = 300.0  # ...or when changes are this old

Accept = Callable[[Sequence[int]], set[int]]
Sessions = Callable[[], Session]


class IndexNotReady(RuntimeError):
    """The index is being built from SQL; vector search can answer once it is done."""


@dataclass(frozen=True)
class ShardEntry:
    """One shard file, as the manifest lists it."""

    tenant_id: int  # the shard's key: a tenant, or a collection in the chunk index
    kind: str
    count: int
    trained_on: int
    file: str
    checksum: str  # sha256 of the file bytes


@dataclass(frozen=True)
class Manifest:
    """The JSON file beside the shard files: what the index holds and how far it has read."""

    model: str
    dimension: int
    index_type: str
    last_id: int  # the files reflect every embedding row up to this id
    last_deletion_id: int  # every deletion-log row up to this one is applied
    count: int
    checksum: str  # sha256 over the shards' checksums, in order
    shards: tuple[ShardEntry, ...] = ()
    format_version: int = FORMAT_VERSION

    @staticmethod
    def combined_checksum(shards: Sequence[ShardEntry]) -> str:
        return hashlib.sha256(" ".join(entry.checksum for entry in shards).encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse a manifest; ValueError or TypeError when it is not one."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("shards", []), list):
            raise ValueError("manifest is not a JSON object with a list of shards")
        shards = tuple(_typed(ShardEntry, entry) for entry in data.pop("shards", []))
        manifest = _typed(cls, {**data, "shards": shards})
        if manifest.checksum != cls.combined_checksum(shards):
            raise ValueError("manifest checksum does not match its shards")
        if manifest.count != sum(entry.count for entry in shards):
            raise ValueError("manifest count is not the sum of its shards")
        return manifest


def _typed(cls: Any, data: Any) -> Any:
    """cls(**data), checking each str and int field has its type."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} entry is not a JSON object")
    value = cls(**data)
    for spec in dataclasses.fields(cls):
        found = getattr(value, spec.name)
        expected = {"str": str, "int": int}.get(str(spec.type))
        if expected and (not isinstance(found, expected) or isinstance(found, bool)):
            raise ValueError(f"{cls.__name__} field {spec.name} is {found!r}")
    return value


class _Unusable(Exception):
    """The persisted index cannot be used; the message says why."""


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


@dataclass(frozen=True)
class Source:
    """The SQL an index follows: a table of vectors and the log of their deletions.

    Both tables have the column shard_key, which picks the shard a vector lives in.
    """

    name: str  # "" keeps the index in the directory itself, else in a folder of this name
    rows: Any  # ORM class with id, created_at, model, vector and the shard key
    deletions: Any  # ORM class with id, embedding_id, model, deleted_at and the shard key
    shard_key: str

    def vector_of(self, model: str) -> Any:
        # Rows of every model are read (ids only for the others), so a missing id is a gap.
        return case((self.rows.model == model, self.rows.vector), else_=None)

    def rows_after(self, session: Session, model: str, after: int) -> Sequence[Any]:
        """(id, created_at, shard, vector or None) of the next rows of any model above after."""
        rows = self.rows
        stmt = (
            select(rows.id, rows.created_at, getattr(rows, self.shard_key), self.vector_of(model))
            .where(rows.id > after)
            .order_by(rows.id)
            .limit(READ_CHUNK)
        )
        return session.execute(stmt).all()

    def rows_by_ids(self, session: Session, model: str, ids: Collection[int]) -> list[Any]:
        """(id, shard, vector or None) of the rows that exist among ids."""
        rows = self.rows
        found: list[Any] = []
        for chunk in _chunks(sorted(ids), IN_CHUNK):
            stmt = select(rows.id, getattr(rows, self.shard_key), self.vector_of(model)).where(
                rows.id.in_(chunk)
            )
            found.extend(session.execute(stmt).all())
        return found

    def _deletion_columns(self) -> tuple[Any, ...]:
        log = self.deletions
        return (log.id, log.embedding_id, log.model, getattr(log, self.shard_key), log.deleted_at)

    def deletions_after(self, session: Session, after: int) -> Sequence[Any]:
        log = self.deletions
        stmt = (
            select(*self._deletion_columns())
            .where(log.id > after)
            .order_by(log.id)
            .limit(READ_CHUNK)
        )
        return session.execute(stmt).all()

    def deletions_by_ids(self, session: Session, ids: Collection[int]) -> list[Any]:
        found: list[Any] = []
        for chunk in _chunks(sorted(ids), IN_CHUNK):
            stmt = select(*self._deletion_columns()).where(self.deletions.id.in_(chunk))
            found.extend(session.execute(stmt).all())
        return found

    def newest_deletion(self, session: Session) -> int:
        return session.execute(select(func.max(self.deletions.id))).scalar() or 0


# Past generations, one shard per tenant; documents' chunks, one shard per collection.
GENERATIONS = Source("", Embedding, EmbeddingDeletion, "tenant_id")
CHUNKS = Source("chunks", ChunkEmbedding, ChunkEmbeddingDeletion, "collection_id")


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


def _fsync_directory(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)  # makes renames into the directory durable
    finally:
        os.close(handle)


def _write_atomic(
    directory: Path, write: Callable[[Path], object], name: Callable[[str], str]
) -> tuple[Path, str]:
    """Write a temp file in directory, fsync it and rename it to name(its sha256).

    Returns the final path and the checksum. The caller fsyncs the directory once after
    its last rename.
    """
    handle, temp_name = tempfile.mkstemp(dir=directory, prefix=".", suffix=".tmp")
    os.close(handle)
    temp = Path(temp_name)
    try:
        write(temp)
        checksum = _sha256_and_sync(temp)
        path = directory / name(checksum)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path, checksum


def _ranked(hits: Iterable[tuple[int, float]]) -> list[tuple[int, float]]:
    return sorted(hits, key=lambda hit: (-hit[1], hit[0]))


# A change journalled against a shard that is being rebuilt: ids removed, then rows added.
_Change = tuple[np.ndarray, np.ndarray, np.ndarray]


class VectorIndex:
    """The FAISS index of one embedding model, sharded by tenant, kept caught up from SQL.

    Thread-safe: searches run alongside catch-ups; FAISS add/remove and search take one
    lock, and one catch-up, persist or shard swap runs at a time. Shard rebuilds run
    outside both locks.
    """

    def __init__(
        self,
        *,
        model: str,
        dimension: int,
        directory: Path,
        persist_every: int = 1000,
        settle_s: float = 300.0,
        policy: ShardPolicy | None = None,
        source: Source = GENERATIONS,
    ) -> None:
        if dimension < 1:
            raise ValueError(f"dimension must be >= 1, got {dimension}")
        if persist_every < 1:
            raise ValueError(f"persist_every must be >= 1, got {persist_every}")
        if settle_s < 0:
            raise ValueError(f"settle_s must be >= 0, got {settle_s}")
        self.model = model
        self.dimension = dimension
        self.persist_every = persist_every
        self.settle_s = settle_s
        self.policy = policy or ShardPolicy()
        self.source = source
        self.directory = Path(directory) / source.name / _file_stem(model)
        self.manifest_path = self.directory / "manifest.json"
        self.lock_path = self.directory / "files.lock"
        self.writer_lock_path = self.directory / "writer.lock"
        self.rebuilt = False  # set by open(): True when the index is built from SQL
        self.rebuild_reason: str | None = None
        self._shards: dict[int, Shard] = {}
        self._persisted: dict[int, ShardEntry] = {}
        self._journals: dict[int, list[_Change]] = {}
        self._rows = _Cursor()
        self._deletions = _Cursor()
        self._unpersisted = 0
        self._persisted_at = time.monotonic()
        self._ready = threading.Event()
        self._writer: IO[bytes] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._index_lock = threading.RLock()  # FAISS: no search during add or remove
        self._sync_lock = threading.RLock()  # one catch-up, persist or swap at a time

    # --- state --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def is_writer(self) -> bool:
        return self._writer is not None

    @property
    def ntotal(self) -> int:
        with self._index_lock:
            return sum(shard.ntotal for shard in self._shards.values())

    @property
    def last_id(self) -> int:
        """The highest embedding id (of any model) read so far."""
        return self._rows.last_id

    def shard_kinds(self) -> dict[int, str]:
        with self._index_lock:
            return {tenant: shard.kind for tenant, shard in self._shards.items()}

    # --- lifecycle ----------------------------------------------------------------------

    def open(self, sessions: Sessions, *, build: bool = True) -> None:
        """Load the persisted index if it is sound, else rebuild it from SQL; then catch up.

        With build=False a needed rebuild is left to the thread of start(); until it is
        done, searches raise IndexNotReady instead of waiting.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        self._claim_writer()
        with self._sync_lock:
            self.rebuild_reason = self._load()
            self.rebuilt = self.rebuild_reason is not None
        if not self.rebuilt:
            self._ready.set()
            with sessions() as session:
                self.catch_up(session)
        elif build:
            self._build(sessions)

    def start(self, sessions: Sessions, *, interval_s: float = 1.0) -> None:
        """Run maintenance in a thread: the build open() left, then maintain() each interval."""
        if self._thread is not None:
            raise RuntimeError("the maintenance thread is already running")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(sessions, interval_s), name="index-maintenance", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop the maintenance thread, persist what changed, give up the writer lock."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.ready and self._unpersisted:
            self.persist()
        if self._writer is not None:
            self._writer.close()  # closing the file releases its lock
            self._writer = None

    def _run(self, sessions: Sessions, interval_s: float) -> None:
        while not self._stop.is_set():
            try:
                if not self.ready:
                    self._build(sessions)
                self.maintain(sessions)
            except Exception:
                logger.exception("maintenance of index %s failed; retrying", self.model)
            self._stop.wait(interval_s)

    # --- catching up and searching ------------------------------------------------------

    def catch_up(self, session: Session) -> int:
        """Index new rows of this model and drop deleted ones; returns rows added + removed.

        Reads through session and leaves its transaction to the caller.
        """
        self._require_ready()
        with self._sync_lock:
            return self._sync(session)

    def search(
        self,
        query: np.ndarray,
        k: int,
        accept: Accept,
        *,
        shard: int | None = None,
        allowed: Collection[int] | None = None,
    ) -> list[tuple[int, float]]:
        """The top-k (id, score) by inner product among the ids that accept approves.

        shard picks one shard (a tenant's, or a collection's in the chunk index; None:
        every shard). accept gets candidate ids
        (each once per search) and returns those the caller allows (its tenant, its SQL
        filters, rows that still exist). Candidates are fetched in widening rounds until k
        are accepted or the shard was searched through. With allowed (the ids a selective
        SQL filter matched), only those ids are scored, exhaustively, so the result is the
        exact top-k of the subset on IVF shards too. Results are ordered by score, then id.
        """
        matrix = self._query_matrix(query, k)
        self._require_ready()
        subset = None
        if allowed is not None:
            subset = np.unique(np.fromiter(allowed, dtype=np.int64, count=len(allowed)))
            if not subset.size:
                return []
        with self._index_lock:
            tenants = [shard] if shard is not None else sorted(self._shards)
        verdicts: dict[int, bool] = {}
        hits: list[tuple[int, float]] = []
        for tenant in tenants:
            hits.extend(self._search_shard(tenant, matrix, k, accept, verdicts, subset))
        return _ranked(hits)[:k]

    def _search_shard(
        self,
        tenant: int,
        matrix: np.ndarray,
        k: int,
        accept: Accept,
        verdicts: dict[int, bool],
        subset: np.ndarray | None,
    ) -> list[tuple[int, float]]:
        fetch = max(WIDEN * k, MIN_FETCH)
        nprobe = 0
        while True:
            with self._index_lock:
                shard = self._shards.get(tenant)
                if shard is None:
                    return []
                total = shard.ntotal if subset is None else min(shard.ntotal, subset.size)
                fetch = min(fetch, total)
                if fetch == 0:
                    return []
                nlist = shard.nlist
                if not nprobe:  # an exhaustive IVF search for a subset: exact
                    nprobe = nlist if subset is not None else self.policy.nprobe_for(nlist)
                hits = shard.search(matrix, fetch, nprobe=nprobe, allowed=subset)
            fresh = [row_id for row_id, _ in hits if row_id not in verdicts]
            if fresh:
                approved = accept(fresh)
                verdicts.update((row_id, row_id in approved) for row_id in fresh)
            accepted = _ranked(hit for hit in hits if verdicts[hit[0]])
            # Fewer hits than asked: the lists searched hold no more candidates.
            exhausted = len(hits) < fetch
            searched_all = fetch >= total or (exhausted and nprobe >= nlist)
            # Done once the k-th accepted hit scores above everything not fetched yet.
            if searched_all or (len(accepted) >= k and hits[-1][1] < accepted[k - 1][1]):
                return accepted[:k]
            if exhausted:
                nprobe = min(nlist, nprobe * WIDEN)
            else:
                fetch *= WIDEN

    # --- maintenance --------------------------------------------------------------------

    def maintain(self, sessions: Sessions) -> None:
        """Catch up, rebuild shards whose kind no longer fits their size, persist if due."""
        if not self.ready:
            return
        with sessions() as session:
            self.catch_up(session)
        with self._index_lock:
            due = [(tenant, self.policy.wanted(shard)) for tenant, shard in self._shards.items()]
        for tenant, kind in due:
            if kind is not None and not self._stop.is_set():
                self.rebuild_shard(tenant, kind)
        self._claim_writer()
        if self._unpersisted and self._persist_due():
            self.persist()

    def rebuild_shard(self, tenant: int, kind: str) -> None:
        """Rebuild one shard as kind from a copy, while the old one keeps serving.

        Changes made to the old shard meanwhile are journalled and replayed on the new one
        before it takes the old one's place.
        """
        with self._sync_lock:
            old = self._shards.get(tenant)
            if old is None:
                return
            ids, vectors = old.snapshot()
            self._journals[tenant] = []
        started = time.perf_counter()
        try:
            new = build(ids, vectors, kind=kind, policy=self.policy, dimension=self.dimension)
        finally:
            del ids, vectors
            with self._sync_lock:
                journal = self._journals.pop(tenant)
        with self._sync_lock:
            for removed, added_ids, added_vectors in journal:
                new.remove(removed.tolist())
                new.add(added_ids, added_vectors)
            with self._index_lock:
                self._shards[tenant] = new
            self._unpersisted += 1
        logger.info(
            "index %s: tenant %d shard rebuilt as %s (%d vectors, %d lists) in %.2fs",
            self.model,
            tenant,
            kind,
            new.ntotal,
            new.nlist,
            time.perf_counter() - started,
        )

    def _persist_due(self) -> bool:
        threshold = max(self.persist_every, int(PERSIST_FRACTION * self.ntotal))
        stale = time.monotonic() - self._persisted_at >= PERSIST_INTERVAL_S
        return self._unpersisted >= threshold or stale

    def persist(self) -> bool:
        """Write changed shards, then the manifest, atomically, under the file lock.

        Only the writer-lock holder writes; returns whether this process wrote.
        """
        if not self.is_writer or not self.ready:
            return False
        with self._sync_lock:
            # Holding the sync lock keeps add/remove away; searches may read meanwhile.
            with _file_lock(self.lock_path, fcntl.LOCK_EX):
                entries = [self._persist_shard(tenant) for tenant in sorted(self._shards)]
                manifest = Manifest(
                    model=self.model,
                    dimension=self.dimension,
                    index_type=INDEX_TYPE,
                    last_id=self._rows.watermark,
                    last_deletion_id=self._deletions.watermark,
                    count=sum(entry.count for entry in entries),
                    checksum=Manifest.combined_checksum(entries),
                    shards=tuple(entries),
                )
                _write_atomic(
                    self.directory,
                    lambda path: path.write_text(manifest.to_json()),
                    lambda _: self.manifest_path.name,
                )
                _fsync_directory(self.directory)
                self._remove_unlisted({entry.file for entry in entries})
            self._persisted = {entry.tenant_id: entry for entry in entries}
            self._unpersisted = 0
            self._persisted_at = time.monotonic()
        return True

    def _persist_shard(self, tenant: int) -> ShardEntry:
        shard = self._shards[tenant]
        entry = self._persisted.get(tenant)
        if entry is not None and not shard.dirty and (self.directory / entry.file).exists():
            return entry
        path, checksum = _write_atomic(
            self.directory,
            lambda temp: faiss.write_index(shard.index, str(temp)),
            lambda digest: f"tenant-{tenant}-{digest[:16]}.faiss",
        )
        shard.dirty = False
        return ShardEntry(
            tenant_id=tenant,
            kind=shard.kind,
            count=shard.ntotal,
            trained_on=shard.trained_on,
            file=path.name,
            checksum=checksum,
        )

    def _remove_unlisted(self, listed: set[str]) -> None:
        for path in self.directory.glob("*.faiss"):
            if path.name not in listed:
                path.unlink(missing_ok=True)

    def _claim_writer(self) -> None:
        """Become the one process that persists, if no other process is."""
        if self._writer is not None:
            return
        handle = open(self.writer_lock_path, "a+b")  # noqa: SIM115 - held while writer
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return
        self._writer = handle
        logger.info("index %s: this process persists it", self.model)

    # --- loading and building -----------------------------------------------------------

    def _require_ready(self) -> None:
        if not self._ready.is_set():
            raise IndexNotReady(
                f"the search index of {self.model} is being rebuilt from the database"
            )

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
        if not self.manifest_path.exists():
            logger.info("no persisted index for %s in %s; building it", self.model, self.directory)
            return "missing"
        try:
            shards, manifest = self._read_persisted()
        except _Unusable as exc:
            reason = str(exc)
            logger.warning(
                "persisted index for %s is unusable (%s); rebuilding", self.model, reason
            )
            return reason
        # Rows above the manifest's last id may have been joined by late ones: read them again.
        for shard in shards.values():
            shard.remove_above(manifest.last_id)
        with self._index_lock:
            self._shards = shards
        self._persisted = {entry.tenant_id: entry for entry in manifest.shards}
        self._rows = _Cursor(last_id=manifest.last_id)
        self._deletions = _Cursor(last_id=manifest.last_deletion_id)
        self._unpersisted = 0
        logger.info(
            "loaded index %s: %d vectors in %d shards", self.model, self.ntotal, len(shards)
        )
        return None

    def _read_persisted(self) -> tuple[dict[int, Shard], Manifest]:
        with _file_lock(self.lock_path, fcntl.LOCK_SH):
            try:
                manifest = Manifest.from_json(self.manifest_path.read_text())
            except (OSError, ValueError, TypeError) as exc:
                raise _Unusable(f"bad manifest: {exc}") from exc
            self._check_manifest(manifest)
            shards = {}
            for entry in manifest.shards:
                shard = self._read_shard(entry)
                shard.dirty = False
                shards[entry.tenant_id] = shard
        return shards, manifest

    def _read_shard(self, entry: ShardEntry) -> Shard:
        path = self.directory / Path(entry.file).name
        try:
            if _sha256_and_sync(path) != entry.checksum:
                raise _Unusable(f"{path.name}: checksum does not match the manifest")
            shard = Shard(faiss.read_index(str(path)), trained_on=entry.trained_on)
        except (OSError, RuntimeError) as exc:
            raise _Unusable(f"unreadable shard file: {exc}") from exc
        if (shard.dimension, shard.ntotal, shard.kind) != (self.dimension, entry.count, entry.kind):
            raise _Unusable(
                f"{path.name} holds {shard.ntotal} x {shard.dimension} {shard.kind}, "
                "not as in the manifest"
            )
        return shard

    def _check_manifest(self, manifest: Manifest) -> None:
        expected = (FORMAT_VERSION, self.model, self.dimension, INDEX_TYPE)
        found = (manifest.format_version, manifest.model, manifest.dimension, manifest.index_type)
        if found != expected:
            raise _Unusable(f"manifest is for (format, model, dimension, type) {found}")

    def _build(self, sessions: Sessions) -> None:
        """Build every shard from SQL, large ones straight as IVF, then persist."""
        started = time.perf_counter()
        with self._sync_lock, sessions() as session:
            self._reset(session)
            self._sync(session)
            with self._index_lock:
                shards = list(self._shards.items())
            for tenant, shard in shards:
                kind = self.policy.wanted(shard)
                if kind is not None:
                    ids, vectors = shard.snapshot()
                    with self._index_lock:
                        del self._shards[tenant]  # frees the flat copy before the build
                    del shard
                    rebuilt = build(
                        ids, vectors, kind=kind, policy=self.policy, dimension=self.dimension
                    )
                    del ids, vectors
                    with self._index_lock:
                        self._shards[tenant] = rebuilt
            self._ready.set()
            self._unpersisted = max(1, self._unpersisted)
            self.persist()
        logger.info(
            "built index %s from SQL: %d vectors in %.2fs",
            self.model,
            self.ntotal,
            time.perf_counter() - started,
        )

    def _reset(self, session: Session) -> None:
        """Start from an empty index. Rows are read from the start; of the deletion log only
        the tail, whose in-flight entries may delete rows the build still reads."""
        newest = self.source.newest_deletion(session)
        with self._index_lock:
            self._shards = {}
        self._persisted = {}
        self._rows = _Cursor()
        self._deletions = _Cursor(last_id=max(0, newest - MAX_GAP_RUN))
        self._unpersisted = 0

    # --- applying SQL to the shards -----------------------------------------------------

    def _sync(self, session: Session) -> int:
        changes = self._add_new_rows(session) + self._fill_row_gaps(session)
        changes += self._apply_deletions(session)
        self._rows.expire()
        self._deletions.expire()
        self._unpersisted += changes
        return changes

    def _add_new_rows(self, session: Session) -> int:
        added = 0
        while rows := self.source.rows_after(session, self.model, self._rows.last_id):
            for row_id, created_at, _, _ in rows:
                self._rows.advance(row_id, created_at, self.settle_s)
            added += self._apply(
                add=[(row[0], row[2], row[3]) for row in rows if row[3] is not None]
            )
            if len(rows) < READ_CHUNK:
                break
        return added

    def _fill_row_gaps(self, session: Session) -> int:
        if not self._rows.gaps:
            return 0
        found = self.source.rows_by_ids(session, self.model, list(self._rows.gaps))
        self._rows.settle(row_id for row_id, _, _ in found)
        late = [row for row in found if row[2] is not None]
        if late:
            logger.info("index %s: %d rows committed after higher ids", self.model, len(late))
        return self._apply(add=late, remove=[(row_id, tenant) for row_id, tenant, _ in late])

    def _apply_deletions(self, session: Session) -> int:
        logged = self._read_deletions(session)
        if not logged:
            return 0
        self._rows.settle(embedding_id for embedding_id, _, _ in logged)
        deleted = {(row_id, tenant) for row_id, model, tenant in logged if model == self.model}
        if not deleted:
            return 0
        # The table, not the log, says what exists now: SQLite can hand a deleted row's id
        # to the next insert, so a logged id may belong to a live row again.
        live = [
            row
            for row in self.source.rows_by_ids(
                session, self.model, {row_id for row_id, _ in deleted}
            )
            if row[2] is not None and row[0] <= self._rows.last_id
        ]
        return self._apply(add=live, remove=sorted(deleted, key=lambda pair: pair[0]))

    def _read_deletions(self, session: Session) -> list[tuple[int, str, int | None]]:
        """(embedding_id, model, tenant_id) of deletion-log rows not applied yet."""
        rows: list[Any] = []
        while chunk := self.source.deletions_after(session, self._deletions.last_id):
            for log_id, *_, deleted_at in chunk:
                self._deletions.advance(log_id, deleted_at, self.settle_s)
            rows.extend(chunk)
            if len(chunk) < READ_CHUNK:
                break
        if self._deletions.gaps:
            late = self.source.deletions_by_ids(session, list(self._deletions.gaps))
            self._deletions.settle(row[0] for row in late)
            rows.extend(late)
        return [(row[1], row[2], row[3]) for row in rows]

    def _apply(
        self,
        *,
        add: Sequence[tuple[int, int, bytes]],
        remove: Sequence[tuple[int, int | None]] = (),
    ) -> int:
        """Remove (id, tenant) pairs, then add (id, tenant, vector) rows, as one step for
        searches; a tenant of None removes the id from every shard. Returns the count
        changed."""
        additions = self._decode(add)
        removals: dict[int, list[int]] = defaultdict(list)
        everywhere: list[int] = []  # ids logged without a tenant: looked for in every shard
        for row_id, tenant in remove:
            (everywhere if tenant is None else removals[tenant]).append(row_id)
        if not removals and not everywhere and not additions:
            return 0
        changed = 0
        empty_ids = np.zeros(0, dtype=np.int64)
        empty_vectors = np.zeros((0, self.dimension), dtype=np.float32)
        with self._index_lock:
            for tenant in (
                set(removals) | set(additions) | (set(self._shards) if everywhere else set())
            ):
                doomed = removals.get(tenant, []) + everywhere
                ids, vectors = additions.get(tenant, (empty_ids, empty_vectors))
                shard = self._shards.get(tenant)
                if shard is None:
                    if not ids.size:
                        continue
                    shard = self._shards[tenant] = Shard.flat(self.dimension)
                changed += shard.remove(doomed) + int(ids.size)
                shard.add(ids, vectors)
                if tenant in self._journals:
                    self._journals[tenant].append(
                        (np.asarray(doomed, dtype=np.int64), ids, vectors)
                    )
                if not shard.ntotal and tenant not in self._journals:
                    del self._shards[tenant]
        return changed

    def _decode(
        self, rows: Sequence[tuple[int, int, bytes]]
    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) per tenant of the rows whose vector fits the dimension."""
        width = 4 * self.dimension
        by_tenant: dict[int, list[tuple[int, bytes]]] = defaultdict(list)
        bad = []
        for row_id, tenant, blob in rows:
            if len(blob) == width:
                by_tenant[tenant].append((row_id, blob))
            else:
                bad.append(row_id)
        if bad:
            logger.warning(
                "index %s: skipped %d rows whose vector is not %d float32 (ids %s...)",
                self.model,
                len(bad),
                self.dimension,
                sorted(bad)[:5],
            )
        decoded = {}
        for tenant, good in by_tenant.items():
            ids = np.fromiter((row_id for row_id, _ in good), dtype=np.int64, count=len(good))
            vectors = np.frombuffer(b"".join(blob for _, blob in good), dtype=np.float32)
            decoded[tenant] = (ids, vectors.reshape(len(good), self.dimension))
        return decoded
