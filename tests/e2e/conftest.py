"""One real API and one real worker per backend: SQLite + the embedded broker, and
PostgreSQL + Redis, shared by every e2e module and stopped when they are done (package
scope: no idle worker may take the fault suite's messages from the shared Redis). Tests
talk HTTP to them; a test that needs a clean slate makes a tenant of its own."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import create_pg_database, drop_pg_database
from tests.utils.server import RemoteService

SERVED = "tiny-random-llama,smollm2-135m-instruct"


@dataclass
class Live:
    service: RemoteService
    backend: str
    database_url: str
    writer: str  # tenant "acme"
    reader: str  # tenant "acme"
    other: str  # tenant "globex"


def _env(backend: str, database_url: str, broker_url: str, cache: Path) -> dict[str, str]:
    env = {
        "GENSERVE_CHAT_MODELS": SERVED,
        "GENSERVE_MODEL_CACHE_DIR": str(cache),
        "GENSERVE_DEVICE": "cpu",
        # Quick sweeps, so a lost publish is recovered within the tests' patience.
        "GENSERVE_SWEEP_INTERVAL_S": "0.5",
        "GENSERVE_REQUEUE_AFTER_S": "2",
        "GENSERVE_MAX_BODY_BYTES": "65536",
        # Lines the tests can read back, and metrics a second old rather than five.
        "GENSERVE_LOG_FORMAT": "json",
        "GENSERVE_HEARTBEAT_INTERVAL_S": "1",
    }
    if database_url:
        env["GENSERVE_DATABASE_URL"] = database_url
    if broker_url:
        env["GENSERVE_BROKER_URL"] = broker_url
    return env


@pytest.fixture(scope="package", params=["sqlite", "postgres"])
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path
) -> Iterator[Live]:
    backend = request.param
    data_dir = tmp_path_factory.mktemp(f"live-{backend}")
    database_url = broker_url = ""
    if backend == "postgres":
        request.getfixturevalue("postgres_available")
        broker_url = request.getfixturevalue("redis_url")
        database_url = create_pg_database()
    service = RemoteService(
        data_dir=data_dir,
        env=_env(backend, database_url, broker_url, model_cache_dir),
        log_dir=data_dir,
    )
    try:
        service.start()
        yield Live(
            service=service,
            backend=backend,
            database_url=database_url or f"sqlite:///{data_dir / 'genserve.sqlite'}",
            writer=service.create_key("acme", "writer"),
            reader=service.create_key("acme", "reader"),
            other=service.create_key("globex", "writer"),
        )
    finally:
        service.close()
        if database_url:
            drop_pg_database(database_url)
