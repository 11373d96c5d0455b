"""Logging of every genserve process: one line per record, as JSON or as text.

The ids of what a record is about travel in context variables: the API's middleware sets
the request id, the worker sets the job id (and the request id that submitted it, which
travels in the task message's headers), and every record logged inside carries them:

    {"ts": "2026-12-04T10:00:00.123+00:00", "level": "INFO", "logger": "genserve.worker",
     "message": "job job_…: succeeded", "request_id": "3f2a…", "job_id": "job_…"}

JSON is the default in production (`GENSERVE_LOG_FORMAT=json|text` chooses).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["json", "text"]

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)
_IDS = {"request_id": request_id, "job_id": job_id}
# The task message header that carries the submitting request's id to the worker.
REQUEST_ID_HEADER = "genserve_request_id"

# The attributes every LogRecord has; anything else was given in `extra=` and is logged.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s%(ids)s"


@contextmanager
def ids(**values: str | None) -> Iterator[None]:
    """Within the block, records carry these ids (request_id, job_id)."""
    tokens = [(_IDS[name], _IDS[name].set(value)) for name, value in values.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextIds(logging.Filter):
    """Puts the current ids on each record (request_id, job_id; None when unset)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _IDS.items():
            if not hasattr(record, name):
                setattr(record, name, var.get())
        return True


class JsonFormatter(logging.Formatter):
    """A record as one JSON object: time, level, logger, message, ids, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD and value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic line, with the ids that are set at its end."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        record.ids = "".join(
            f" {name}={getattr(record, name)}"
            for name in _IDS
            if getattr(record, name, None) is not None
        )
        return super().format(record)


def configure(fmt: LogFormat = "text", level: int | str = logging.INFO) -> None:
    """Send every logger's records to stderr as `fmt`, with the context's ids.

    Replaces the root logger's handlers, and makes uvicorn's and Celery's loggers
    propagate to it, so a process writes one format only.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextIds())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "celery", "celery.worker", "celery.app.trace"):
        named = logging.getLogger(name)
        named.handlers.clear()
        named.propagate = True
    # A line per HTTP request made (the CLI's, the clients'): the access log has the API's.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
