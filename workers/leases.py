"""Leases of the jobs a worker process is running, renewed together (one statement for
all of them, however many share the batch), and the cancellations they bring back."""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.db import crud

logger = logging.getLogger("genserve.worker")

# How often leases are renewed, and so how soon a cancellation reaches a running job.
RENEW_EVERY_S = 0.5


class LeaseKeeper:
    """Renews the leases of watched jobs every `every_s` on its own thread.

    Args:
        factory: Sessions on the job database.
        lease_s: Length of each renewed lease.
        every_s: Seconds between renewals.
    """

    def __init__(
        self, factory: sessionmaker[Session], *, lease_s: float, every_s: float = RENEW_EVERY_S
    ) -> None:
        self._factory = factory
        self.lease_s = lease_s
        self._every_s = every_s
        self._watched: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, job_id: str) -> threading.Event:
        """Keep the job's lease; the event is set once its cancellation is asked for."""
        with self._lock:
            cancelled = self._watched.setdefault(job_id, threading.Event())
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="genserve-leases", daemon=True
                )
                self._thread.start()
        return cancelled

    def release(self, job_id: str) -> None:
        with self._lock:
            self._watched.pop(job_id, None)

    def renew(self) -> None:
        """One renewal of every watched lease (the thread calls it every `every_s`)."""
        with self._lock:
            watched = dict(self._watched)
        if not watched:
            return
        try:
            with self._factory() as session:
                cancelled = crud.renew_leases(session, job_ids=list(watched), lease_s=self.lease_s)
        except SQLAlchemyError as exc:  # the database is away; the next round retries
            logger.warning("renewing %d job leases failed: %s", len(watched), exc)
            return
        for job_id in cancelled:
            watched[job_id].set()

    def _run(self) -> None:
        while True:
            time.sleep(self._every_s)
            self.renew()
