"""Job event streams on both channels, and following a job with SQL as the fallback."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.db.session import make_engine, make_sessionmaker
from service.db.tables import Job
from service.events import EventSink, EventSource, make_sink, make_source
from service.follow import Delta, Finished, Idle, Restarted, follow_job
from tests.utils.factories import finish, make_job, make_key

T = TypeVar("T")


@pytest.fixture(params=["sqlite", "redis"])
def channel(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[EventSink, str]:
    """A sink, and the URL to open a source with (an asyncio Redis client has one loop)."""
    url = (
        request.getfixturevalue("redis_url")
        if request.param == "redis"
        else f"sqlite:///{tmp_path / 'events.sqlite'}"
    )
    sink = make_sink(url)
    request.addfinalizer(sink.close)
    return sink, url


def run_with_source(url: str, body: Callable[[EventSource], Awaitable[T]]) -> T:
    async def run() -> T:
        source = make_source(url)
        try:
            return await body(source)
        finally:
            await source.close()

    return asyncio.run(run())


def test_events_come_in_order_and_from_a_position(channel: tuple[EventSink, str]) -> None:
    sink, url = channel
    job_id = f"job_{uuid.uuid4().hex}"
    sink.publish(job_id, "start", {"attempt": 1})
    for text in ("a", "b", "c"):
        sink.publish(job_id, "token", {"attempt": 1, "text": text})

    async def read(source: EventSource) -> tuple[list, list]:
        first = await source.read(job_id, after=None, timeout_s=1)
        rest = await source.read(job_id, after=first[1].id, timeout_s=1)
        return first, rest

    first, rest = run_with_source(url, read)
    assert [(e.type, e.data.get("text")) for e in first] == [
        ("start", None),
        ("token", "a"),
        ("token", "b"),
        ("token", "c"),
    ]
    assert [e.data["text"] for e in rest] == ["b", "c"]


def test_a_waiting_reader_wakes_on_publish(channel: tuple[EventSink, str]) -> None:
    sink, url = channel
    job_id = f"job_{uuid.uuid4().hex}"

    async def read(source: EventSource) -> list:
        assert await source.read(job_id, after=None, timeout_s=0.05) == []
        later = threading.Timer(0.2, sink.publish, args=(job_id, "token", {"text": "x"}))
        later.start()
        try:
            return await source.read(job_id, after=None, timeout_s=10)
        finally:
            later.join()

    events = run_with_source(url, read)
    assert [e.data["text"] for e in events] == ["x"]


@pytest.fixture
def sessions(sqlite_url: str) -> sessionmaker[Session]:
    return make_sessionmaker(make_engine(sqlite_url))


def collect(sessions: sessionmaker[Session], url: str, job: Job, **kwargs) -> list:
    async def run(source: EventSource) -> list:
        items = []
        async for item in follow_job(
            sessions, source, tenant_id=job.tenant_id, job_id=job.id, poll_s=0.05, **kwargs
        ):
            if not isinstance(item, Idle):
                items.append(item)
        return items

    return run_with_source(url, run)


@pytest.fixture
def queued(sessions: sessionmaker[Session]) -> Job:
    with sessions() as session:
        tenant_id, _ = make_key(session)
        return make_job(session, tenant_id)


def test_a_job_without_a_stream_is_read_from_sql(
    sessions: sessionmaker[Session], channel: tuple[EventSink, str], queued: Job
) -> None:
    finish(sessions, queued, "hello world")
    items = collect(sessions, channel[1], queued)
    assert items[0] == Delta("hello world")
    assert isinstance(items[1], Finished) and items[1].job.status == "succeeded"


def test_sql_completes_a_stream_cut_short(
    sessions: sessionmaker[Session], channel: tuple[EventSink, str], queued: Job
) -> None:
    sink, url = channel
    sink.publish(queued.id, "start", {"attempt": 1})
    sink.publish(queued.id, "token", {"attempt": 1, "text": "hello"})
    finish(sessions, queued, "hello world")
    items = collect(sessions, url, queued)
    assert items[:2] == [Delta("hello"), Delta(" world")]
    assert isinstance(items[2], Finished)
    silent = collect(sessions, url, queued, text=False)
    assert len(silent) == 1 and isinstance(silent[0], Finished)


def test_a_new_attempt_after_streamed_text_is_reported(
    sessions: sessionmaker[Session], channel: tuple[EventSink, str], queued: Job
) -> None:
    sink, url = channel
    sink.publish(queued.id, "start", {"attempt": 1})
    sink.publish(queued.id, "token", {"attempt": 1, "text": "half"})
    sink.publish(queued.id, "start", {"attempt": 2})
    with pytest.raises(Restarted):
        collect(sessions, url, queued)
