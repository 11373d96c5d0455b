"""One engine per process; sessions come from its sessionmaker."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import psycopg
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
# An execution option: PostgreSQL sends the statement's results in its binary format, in
# which bytea is the bytes themselves rather than twice as many hex digits to decode.
BINARY_RESULTS = "genserve_binary_results"


def _sqlite_pragmas(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers go on while one writer commits; the busy timeout makes a writer
    # wait for the lock instead of failing at once with "database is locked".
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    # Deleted text is overwritten, not left in free pages of the file (rule: forgotten).
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()


# Twenty digits in a row: maybe an integer past 64 bits, which orjson would read as a
# float; json reads it exactly.
_LONG_DIGITS = re.compile(r"\d{20}")
_LONG_DIGITS_BYTES = re.compile(rb"\d{20}")


def load_json(document: str | bytes) -> Any:
    """A JSON column's value, as json.loads reads it: with orjson, several times faster on
    the rows a listing or an export reads, unless the document holds twenty digits in a
    row (in a string, or an integer orjson would turn into a float), or what orjson
    refuses and json takes (NaN, a number past a double's range)."""
    pattern = _LONG_DIGITS_BYTES if isinstance(document, bytes) else _LONG_DIGITS
    if not pattern.search(document):  # type: ignore[arg-type]
        try:
            return orjson.loads(document)
        except orjson.JSONDecodeError:
            pass
    return json.loads(document)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for url; SQLite files get WAL, a busy timeout and foreign keys."""
    kwargs.setdefault("json_deserializer", load_json)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    engine = create_engine(url, **kwargs)
    event.listen(engine, "before_cursor_execute", _binary_results)
    return engine


def _binary_results(
    connection: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
) -> None:
    # psycopg's cursor.format: the format of the results of the next statement it runs.
    if context is not None and context.execution_options.get(BINARY_RESULTS):
        cursor.format = psycopg.pq.Format.BINARY


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)
