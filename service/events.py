"""Job event streams: a worker publishes a job's tokens as it makes them, the API reads them.

A stream only brings early what SQL will hold anyway (rule 1): readers fall back to the
stored job when a stream is gone, late or cut short, so losing one loses nothing.

Two backends, chosen by URL: Redis streams (XADD / XREAD BLOCK), for any deployment
whose processes share a Redis; and a SQLite file in WAL mode, polled, for the embedded
default where the API and the worker share a disk.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import redis

EVENT_TYPES = ("start", "token", "end")
# A stream outlives its job by this long, for late readers of /v1/jobs/{id}/events.
STREAM_TTL_S = 3600
READ_BATCH = 512
SQLITE_POLL_S = 0.01
# What a channel raises when it is down; publishers log these and go on.
CHANNEL_ERRORS: tuple[type[Exception], ...] = (OSError, sqlite3.Error, redis.RedisError)


@dataclass(frozen=True)
class Event:
    id: str  # the position in its stream, to read on from
    type: str  # one of EVENT_TYPES
    data: dict[str, Any]


class EventSink(Protocol):
    """The worker's side: publish and forget; a failure to publish must not fail a job."""

    def publish(self, job_id: str, type: str, data: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class EventSource(Protocol):
    """The API's side: the events after `after`, waiting up to timeout_s for the first."""

    async def read(self, job_id: str, *, after: str | None, timeout_s: float) -> list[Event]: ...

    async def close(self) -> None: ...


def _redis_key(job_id: str) -> str:
    return f"genserve:events:{job_id}"


class RedisSink:
    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)

    def publish(self, job_id: str, type: str, data: dict[str, Any]) -> None:
        key = _redis_key(job_id)
        pipeline = self._client.pipeline(transaction=False)
        pipeline.xadd(key, {"type": type, "data": json.dumps(data)})
        pipeline.expire(key, STREAM_TTL_S)
        pipeline.execute()

    def close(self) -> None:
        self._client.close()


class RedisSource:
    def __init__(self, url: str) -> None:
        import redis.asyncio

        self._client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=5)

    async def read(self, job_id: str, *, after: str | None, timeout_s: float) -> list[Event]:
        replies: Any = await self._client.xread(
            {_redis_key(job_id): after or "0-0"},
            count=READ_BATCH,
            block=max(1, int(timeout_s * 1000)),
        )
        events: list[Event] = []
        for _key, entries in replies or ():
            for entry_id, fields in entries:
                events.append(
                    Event(
                        id=entry_id.decode(),
                        type=fields[b"type"].decode(),
                        data=json.loads(fields[b"data"]),
                    )
                )
        return events

    async def close(self) -> None:
        await self._client.aclose()


_SQLITE_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        type TEXT NOT NULL,
        data TEXT NOT NULL,
        created REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS ix_events_job ON events (job_id, id)",
    "CREATE INDEX IF NOT EXISTS ix_events_created ON events (created)",
)
# The sink forgets expired streams after every this many publishes.
_SQLITE_PRUNE_EVERY = 2000


def _sqlite_connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    # Events are derived data: losing the last few to a power cut costs nothing.
    connection.execute("PRAGMA synchronous=OFF")
    for statement in _SQLITE_SCHEMA:
        connection.execute(statement)
    return connection


class SqliteSink:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._local = threading.local()
        self._published = 0

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = _sqlite_connect(self._path)
        return connection

    def publish(self, job_id: str, type: str, data: dict[str, Any]) -> None:
        connection = self._connection()
        now = time.time()
        connection.execute(
            "INSERT INTO events (job_id, type, data, created) VALUES (?, ?, ?, ?)",
            (job_id, type, json.dumps(data), now),
        )
        self._published += 1
        if self._published % _SQLITE_PRUNE_EVERY == 0:
            connection.execute("DELETE FROM events WHERE created < ?", (now - STREAM_TTL_S,))

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()


class SqliteSource:
    """Polls the file every 10 ms; an indexed read of a WAL file never waits on the writer."""

    def __init__(self, path: Path) -> None:
        self._connection = _sqlite_connect(path)

    async def read(self, job_id: str, *, after: str | None, timeout_s: float) -> list[Event]:
        deadline = time.monotonic() + timeout_s
        while True:
            rows = self._connection.execute(
                "SELECT id, type, data FROM events WHERE job_id = ? AND id > ? ORDER BY id LIMIT ?",
                (job_id, int(after or 0), READ_BATCH),
            ).fetchall()
            if rows or time.monotonic() >= deadline:
                return [Event(id=str(i), type=t, data=json.loads(d)) for i, t, d in rows]
            await asyncio.sleep(SQLITE_POLL_S)

    async def close(self) -> None:
        self._connection.close()


def _sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


def make_sink(url: str) -> EventSink:
    """The publishing side for an events URL (redis://... or sqlite:///path)."""
    if url.startswith(("redis://", "rediss://")):
        return RedisSink(url)
    if url.startswith("sqlite:///"):
        return SqliteSink(_sqlite_path(url))
    raise ValueError(f"events URL must start with redis://, rediss:// or sqlite:///, got {url!r}")


def make_source(url: str) -> EventSource:
    """The reading side for an events URL (redis://... or sqlite:///path)."""
    if url.startswith(("redis://", "rediss://")):
        return RedisSource(url)
    if url.startswith("sqlite:///"):
        return SqliteSource(_sqlite_path(url))
    raise ValueError(f"events URL must start with redis://, rediss:// or sqlite:///, got {url!r}")
