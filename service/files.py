"""Files kept in SQL: bytes in 1 MiB chunks, written and read a chunk at a time.

A file never has to fit in memory: FileWriter flushes each full chunk as it goes, and
the readers fetch one chunk per query, so nothing holds a cursor open across a yield
and the caller may commit its session between items.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import insert, select
from sqlalchemy.orm import Session, sessionmaker

from service.db import crud
from service.db.tables import File, FileChunk, new_id

CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class FileLimits:
    """Bounds on an uploaded file: its size and its number of lines."""

    max_bytes: int
    max_lines: int


class FileLimitExceeded(ValueError):
    """A file grew past a bound given to its FileWriter."""


class FileTooLarge(FileLimitExceeded):
    pass


class TooManyLines(FileLimitExceeded):
    pass


class FileWriter:
    """Writes a new File row and its chunks in the caller's session; the caller commits."""

    def __init__(
        self,
        *,
        session: Session,
        tenant_id: int,
        purpose: str,
        filename: str,
        max_bytes: int | None,
        max_lines: int | None,
        chunk_bytes: int = CHUNK_BYTES,
        kind: str = "real",
        media_type: str | None = None,
        generation_id: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.session = session
        self.max_bytes = max_bytes
        self.max_lines = max_lines
        self.chunk_bytes = chunk_bytes
        self.file = File(
            id=new_id("file"),
            tenant_id=tenant_id,
            purpose=purpose,
            filename=filename,
            bytes=0,
            lines=0,
            sha256="",
            kind=kind,
            media_type=media_type,
            generation_id=generation_id,
            meta=meta,
        )
        # The row goes in first: PostgreSQL checks each chunk's foreign key on insert.
        session.add(self.file)
        session.flush()
        self._buffer = bytearray()
        self._hash = hashlib.sha256()
        self._size = 0
        self._newlines = 0
        self._last_byte = b"\n"
        self._seq = 0

    def write(self, data: bytes) -> None:
        """Append data; raises FileTooLarge or TooManyLines past the writer's bounds."""
        if not data:
            return
        if self.max_bytes is not None and self._size + len(data) > self.max_bytes:
            raise FileTooLarge(f"the file is larger than the limit of {self.max_bytes} bytes")
        newlines = self._newlines + data.count(b"\n")
        if self.max_lines is not None and newlines > self.max_lines:
            raise TooManyLines(f"the file has more than the limit of {self.max_lines} lines")
        self._hash.update(data)
        self._size += len(data)
        self._newlines = newlines
        self._last_byte = data[-1:]
        self._buffer += data
        while len(self._buffer) >= self.chunk_bytes:
            self._insert_chunk(bytes(self._buffer[: self.chunk_bytes]))
            del self._buffer[: self.chunk_bytes]

    def close(self) -> File:
        """Write the last chunk and fill in the row's size, line count and sha256."""
        lines = self._newlines + (self._last_byte != b"\n")
        if self.max_lines is not None and lines > self.max_lines:
            raise TooManyLines(f"the file has more than the limit of {self.max_lines} lines")
        if self._buffer:
            self._insert_chunk(bytes(self._buffer))
            self._buffer.clear()
        self.file.bytes = self._size
        self.file.lines = lines
        self.file.sha256 = self._hash.hexdigest()
        self.session.flush()
        return self.file

    def _insert_chunk(self, data: bytes) -> None:
        # A Core insert: no ORM object stays in the session holding the chunk's bytes.
        self.session.execute(
            insert(FileChunk).values(file_id=self.file.id, seq=self._seq, data=data)
        )
        self._seq += 1


def iter_chunks(session: Session, file_id: str) -> Iterator[bytes]:
    """The file's chunks in order, one query each."""
    seq = -1
    while True:
        row = session.execute(
            select(FileChunk.seq, FileChunk.data)
            .where(FileChunk.file_id == file_id, FileChunk.seq > seq)
            .order_by(FileChunk.seq)
            .limit(1)
        ).first()
        if row is None:
            return
        seq = row.seq
        yield row.data


def stream_chunks(factory: sessionmaker[Session], file_id: str) -> Iterator[bytes]:
    """A download's body: the file's chunks read in a session of its own.

    The request's session is closed by the time the body is sent; this one lives as long
    as the download.
    """
    with factory() as session:
        for chunk in iter_chunks(session, file_id):
            # End the read transaction while the client takes the chunk, so a slow download
            # pins no snapshot, table lock or SQLite WAL checkpoint.
            session.rollback()
            yield chunk


def iter_lines(session: Session, file_id: str, *, start: int = 0) -> Iterator[bytes]:
    """Each line without its newline, from line number start (0-based) on.

    A final line without a newline counts when it is not empty, as in File.lines.
    """
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    number = 0
    pending = bytearray()  # the start of a line that runs into the next chunk
    for chunk in iter_chunks(session, file_id):
        position = 0
        while (end := chunk.find(b"\n", position)) >= 0:
            if number >= start:
                yield bytes(pending) + chunk[position:end] if pending else chunk[position:end]
            pending.clear()
            number += 1
            position = end + 1
        pending += chunk[position:]
    if pending and number >= start:
        yield bytes(pending)


def get_file(session: Session, *, tenant_id: int, file_id: str) -> File | None:
    return session.scalar(select(File).where(File.id == file_id, File.tenant_id == tenant_id))


def list_files(
    session: Session,
    *,
    tenant_id: int,
    purpose: str | None,
    after: str | None,
    kind: str | None = None,
    limit: int,
    order: Literal["asc", "desc"],
) -> tuple[list[File], bool]:
    """A page of the tenant's files by creation time, and whether more follow."""
    query = select(File).where(File.tenant_id == tenant_id)
    if purpose:
        query = query.where(File.purpose == purpose)
    if kind:
        query = query.where(File.kind == kind)
    return crud.page_by_id(
        session, query, File, after=after, limit=limit, descending=order == "desc"
    )


def delete_file(session: Session, *, file: File) -> None:
    """Delete the row; its chunks go with it (ON DELETE CASCADE, foreign keys on in SQLite)."""
    session.delete(file)
    session.flush()
