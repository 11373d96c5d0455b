"""Following a job from the API: its tokens from the event stream, its end from SQL.

The stream makes tokens arrive as the worker makes them; SQL says how the job ended.
A job whose stream is missing (a batch job, a worker that could not publish, a reader
that comes after the stream expired) is still followed to its end: the reader polls
SQL, and whatever text the stream did not bring arrives as one last delta.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
from sqlalchemy.orm import Session, sessionmaker

from service.db import crud
from service.db.tables import TERMINAL_STATUSES, Job
from service.events import EventSource

# Without events, SQL is asked this often whether the job has ended.
POLL_S = 1.0


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Idle:
    """A quiet poll: nothing new yet (readers send keep-alives, check their client)."""


@dataclass(frozen=True)
class Finished:
    """The job's final row (its generation loaded), read after it ended."""

    job: Job


class Restarted(Exception):
    """The worker running the job was lost after it streamed text; a new attempt began."""


def _load(factory: sessionmaker[Session], tenant_id: int, job_id: str) -> Job | None:
    # Job.generation loads with the job (selectin), so the row is whole once detached.
    with factory() as session:
        return crud.get_job(session, tenant_id=tenant_id, job_id=job_id)


async def load_job(factory: sessionmaker[Session], tenant_id: int, job_id: str) -> Job | None:
    return await anyio.to_thread.run_sync(_load, factory, tenant_id, job_id)


class _Progress:
    """What the reader has passed on: the attempt it follows and the text sent."""

    def __init__(self, *, text: bool) -> None:
        self.text = text
        self.attempt: int | None = None
        self.sent = ""
        self.ended = False

    def take(self, type_: str, data: dict[str, object]) -> str | None:
        """Apply one event; returns text to pass on, if any."""
        attempt = data.get("attempt")
        if type_ == "start":
            if self.text and self.attempt is not None and attempt != self.attempt and self.sent:
                raise Restarted(f"attempt {attempt} began after attempt {self.attempt} streamed")
            self.attempt = attempt  # type: ignore[assignment]
        elif type_ == "token" and attempt == self.attempt and self.text:
            text = str(data["text"])
            self.sent += text
            return text
        elif type_ == "end" and attempt == self.attempt:
            self.ended = True
        return None

    def rest(self, job: Job) -> str | None:
        """The stored output's text that the stream did not bring."""
        if job.generation is None or not self.text:
            return None
        output = job.generation.output
        if not output.startswith(self.sent):
            raise Restarted("the stored output differs from the streamed text")
        return output[len(self.sent) :] or None


async def follow_job(
    factory: sessionmaker[Session],
    source: EventSource,
    *,
    tenant_id: int,
    job_id: str,
    poll_s: float = POLL_S,
    text: bool = True,
) -> AsyncIterator[Delta | Idle | Finished]:
    """Deltas of the job's text as they come, then Finished once SQL holds its end.

    Idle comes after each quiet poll_s, so a reader gets control at least that often.
    With text=False only the end is awaited (the stream still says when it comes).
    """
    progress = _Progress(text=text)
    after: str | None = None
    while True:
        events = await source.read(job_id, after=after, timeout_s=poll_s)
        for event in events:
            after = event.id
            piece = progress.take(event.type, event.data)
            if piece:
                yield Delta(piece)
        if events and not progress.ended:
            continue
        job = await load_job(factory, tenant_id, job_id)
        if job is None:  # deleted while followed
            raise Restarted(f"job {job_id} was deleted")
        if job.status in TERMINAL_STATUSES:
            rest = progress.rest(job)
            if rest:
                yield Delta(rest)
            yield Finished(job)
            return
        if not events:
            yield Idle()
