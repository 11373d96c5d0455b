"""The broker side of the service: Celery configuration and publishing jobs by task name.

The API never imports the worker's task code (DESIGN: service enqueues by task name).
"""

from __future__ import annotations

import fcntl
import logging
import sqlite3
from pathlib import Path
from typing import Any

from celery import Celery
from kombu.exceptions import KombuError
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport.sqlalchemy import Transport as SQLAlchemyTransport
from sqlalchemy.exc import SQLAlchemyError

from service import logs

logger = logging.getLogger("genserve.queue")

RUN_JOB_TASK = "genserve.run_job"
PREPARE_BATCH_TASK = "genserve.prepare_batch"
FINALIZE_BATCH_TASK = "genserve.finalize_batch"
TRAIN_MODEL_TASK = "genserve.train_model"
TRAIN_QUEUE = "train"
# Redis redelivers an unacknowledged message after the visibility timeout; it must be
# longer than any job runs, or a long job is delivered twice (the claim in SQL still
# stops the second run, but it wastes a worker slot).
REDIS_VISIBILITY_TIMEOUT_S = 4 * 3600


EMBEDDED_SCHEME = "gsqla"
EMBEDDED_POLL_S = 0.1


class EmbeddedTransport(SQLAlchemyTransport):
    """kombu's SQLAlchemy transport polling every 0.1 s instead of every 1 s.

    The transport hands its options to create_engine, so the interval cannot go there; a
    poll of an empty SQLite queue costs microseconds, and the default second of sleep would
    add half a second to the average job.
    """

    polling_interval = EMBEDDED_POLL_S


TRANSPORT_ALIASES.setdefault(EMBEDDED_SCHEME, f"{__name__}:EmbeddedTransport")


def embedded_broker_url(path: Path) -> str:
    return f"{EMBEDDED_SCHEME}+sqlite:///{path}"


def prepare_embedded_broker(path: Path) -> None:
    """Create the embedded broker's SQLite file in WAL mode (the mode persists in the file)
    and kombu's tables in it, once, however many processes start together."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        with sqlite3.connect(path, timeout=30) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
        # Else kombu creates them on each process's first publish: two processes doing it
        # at once fail with "table already exists", and the failed publish leaves its
        # producer a closed channel (AttributeError on the next publish).
        app = make_celery("genserve-prepare", embedded_broker_url(path))
        try:
            with app.connection_for_write() as broker:
                broker.default_channel.session  # noqa: B018 - opening it makes the tables
        finally:
            app.close()


def celery_config(broker_url: str, *, default_queue: str = "interactive") -> dict[str, Any]:
    """Celery settings shared by the API's publisher and the worker."""
    transport_options: dict[str, Any] = {}
    # Task events (what Flower shows): on Redis they are pub/sub messages, dropped when no
    # one listens; kombu's SQLAlchemy transport has no fanout to carry them.
    events = broker_url.startswith(("redis://", "rediss://", "amqp://", "pyamqp://"))
    if broker_url.startswith(("sqla+sqlite", f"{EMBEDDED_SCHEME}+sqlite")):
        # Passed to create_engine by kombu: the driver's timeout is SQLite's busy timeout.
        transport_options = {"connect_args": {"timeout": 30}}
    elif broker_url.startswith(("redis://", "rediss://")):
        transport_options = {
            "visibility_timeout": REDIS_VISIBILITY_TIMEOUT_S,
            # BRPOP on the queues in the worker's order: interactive before batch.
            "queue_order_strategy": "priority",
        }
    return {
        "worker_send_task_events": events,
        "broker_url": broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        # Job state and results live in SQL, not in a result backend.
        "task_ignore_result": True,
        "result_backend": None,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": default_queue,
        # Acknowledge after the result is stored; a lost worker's message is redelivered.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 3,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 2,
        },
    }


def make_celery(name: str, broker_url: str) -> Celery:
    app = Celery(name)
    app.conf.update(celery_config(broker_url))
    return app


class JobPublisher:
    """Publishes job ids to the broker; the job row is always committed first."""

    def __init__(self, app: Celery) -> None:
        self._app = app

    def publish(self, job_id: str, queue: str) -> bool:
        """Send the job; False (logged) if the broker is unreachable: the sweeper retries."""
        return self.send(RUN_JOB_TASK, job_id, queue=queue)

    def send(self, task: str, object_id: str, *, queue: str) -> bool:
        """Send a task about one stored object; False (logged) if the broker is unreachable."""
        request_id = logs.request_id.get()
        headers = {logs.REQUEST_ID_HEADER: request_id} if request_id else None
        try:
            self._app.send_task(task, args=[object_id], queue=queue, headers=headers)
        except (KombuError, OSError, SQLAlchemyError) as exc:
            logger.warning(
                "publishing %s %s failed, the sweeper will retry: %s", task, object_id, exc
            )
            return False
        return True

    def ping(self, timeout_s: float = 2.0) -> None:
        """Open a connection and a channel to the broker, or raise why it cannot."""
        with self._app.connection_for_write() as broker:
            broker.ensure_connection(max_retries=1, timeout=timeout_s)
            channel = broker.channel()
            try:
                client = getattr(channel, "client", None)  # Redis: a command, not only a socket
                if client is not None and hasattr(client, "ping"):
                    client.ping()
            finally:
                channel.close()

    def close(self) -> None:
        self._app.close()
