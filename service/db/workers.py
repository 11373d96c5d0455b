"""Worker heartbeats: written by each worker process, read by /readyz and /metrics."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from service.db.tables import WorkerHeartbeat, utcnow

# A worker not heard from for this many of its beats is gone.
MISSED_BEATS = 3
# Rows of workers gone this long are removed by the sweeper.
FORGET_AFTER = timedelta(hours=1)


def beat(
    session: Session,
    *,
    worker_id: str,
    hostname: str,
    pid: int,
    queues: Sequence[str],
    models: Sequence[str],
    device: str,
    metrics: list[Any],
) -> None:
    """Record that the worker is alive now, with its metrics (the caller commits).

    Only the worker itself writes its row, so an update that finds none can insert it.
    """
    now = utcnow()
    values = {
        "queues": list(queues),
        "models": list(models),
        "device": device,
        "seen_at": now,
        "metrics": metrics,
    }
    found = session.execute(
        update(WorkerHeartbeat).where(WorkerHeartbeat.id == worker_id).values(**values)
    )
    if not found.rowcount:  # type: ignore[attr-defined]
        session.add(
            WorkerHeartbeat(id=worker_id, hostname=hostname, pid=pid, started_at=now, **values)
        )


def forget(session: Session, *, worker_id: str) -> None:
    """A worker that stops cleanly removes its row (the caller commits)."""
    session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.id == worker_id))


def forget_gone(session: Session, *, now: datetime | None = None) -> int:
    """Remove the rows of workers gone for FORGET_AFTER; returns how many."""
    cutoff = (now or utcnow()) - FORGET_AFTER
    result = session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.seen_at < cutoff))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def live_since(interval_s: float, now: datetime | None = None) -> datetime:
    """A worker seen at or after this is live: it missed fewer than MISSED_BEATS beats."""
    return (now or utcnow()) - timedelta(seconds=interval_s * MISSED_BEATS)


def live(
    session: Session, *, interval_s: float, now: datetime | None = None
) -> list[WorkerHeartbeat]:
    """The workers heard from within MISSED_BEATS beats, by id."""
    query = select(WorkerHeartbeat).where(WorkerHeartbeat.seen_at >= live_since(interval_s, now))
    return list(session.scalars(query.order_by(WorkerHeartbeat.id)))


def recent(session: Session) -> list[WorkerHeartbeat]:
    """Every worker still remembered (gone ones until forget_gone), by id."""
    return list(session.scalars(select(WorkerHeartbeat).order_by(WorkerHeartbeat.id)))
