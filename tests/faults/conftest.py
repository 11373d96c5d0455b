"""The production configuration (PostgreSQL + Redis) in real processes, with short
leases and sweeps so that recoveries happen within a test's patience."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import make_url

from tests.conftest import create_pg_database, drop_pg_database
from tests.faults.proxy import Proxy
from tests.utils.server import RemoteService


@dataclass
class Faulty:
    service: RemoteService
    database_url: str  # direct, for counting; the service reaches it through `proxy`
    proxy: Proxy
    redis_url: str
    key: str


@pytest.fixture(scope="module")
def faulty(
    tmp_path_factory: pytest.TempPathFactory,
    model_cache_dir: Path,
    postgres_available: None,
    redis_url: str,
) -> Iterator[Faulty]:
    data_dir = tmp_path_factory.mktemp("faults")
    database_url = create_pg_database()
    url = make_url(database_url)
    proxy = Proxy((url.host or "127.0.0.1", url.port or 5432))
    proxy.up()
    env = {
        "GENSERVE_DATABASE_URL": url.set(port=proxy.port).render_as_string(hide_password=False),
        "GENSERVE_BROKER_URL": redis_url,
        "GENSERVE_CHAT_MODELS": "tiny-random-llama",
        "GENSERVE_MODEL_CACHE_DIR": str(model_cache_dir),
        "GENSERVE_DEVICE": "cpu",
        "GENSERVE_BUILTIN_MODELS": "false",
        # A killed worker's jobs are taken back 3 s after its last lease renewal.
        "GENSERVE_JOB_LEASE_S": "3",
        "GENSERVE_SWEEP_INTERVAL_S": "0.5",
        "GENSERVE_REQUEUE_AFTER_S": "2",
    }
    service = RemoteService(data_dir=data_dir, env=env, log_dir=data_dir)
    try:
        service.start()
        key = service.create_key("acme", "writer")
        yield Faulty(service, database_url, proxy, redis_url, key)
    finally:
        service.close()
        proxy.down()
        drop_pg_database(database_url)
