"""Fixtures for real parts: migrated SQLite files, fresh PostgreSQL databases, Redis.

PostgreSQL and Redis tests skip with a reason when those servers are not reachable,
unless GENSERVE_REQUIRE_SERVICES=1 (set by .ci/run), where they fail instead.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from models.backends.causal_lm import CausalLM
from service.db.migrate import upgrade

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_DSN = os.environ.get(
    "GENSERVE_TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test"
)
REDIS_URL = os.environ.get("GENSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
REQUIRE_SERVICES = os.environ.get("GENSERVE_REQUIRE_SERVICES") == "1"

# Converted weights are cached across runs, so SmolLM2 is dequantized once per machine.
os.environ.setdefault("GENSERVE_TEST_MODEL_CACHE", str(ROOT / ".cache" / "models"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def unavailable(what: str, error: Exception) -> None:
    message = f"{what} is not reachable ({error}); start it to run these tests"
    if REQUIRE_SERVICES:
        pytest.fail(message + " (required: GENSERVE_REQUIRE_SERVICES=1)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    path = Path(os.environ["GENSERVE_TEST_MODEL_CACHE"])
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> CausalLM:
    """The tiny random Llama (built in code), loaded once for the unit tests.

    GENSERVE_TEST_DEVICE=cuda runs the decoding and engine tests on a GPU. The weights stay
    float32 there (TF32 off): the tests compare batched and lone decoding token for token,
    which bfloat16 rounding would turn into a test of near-ties.
    """
    from models.backends import load_model
    from models.registry import get_spec

    device = os.environ.get("GENSERVE_TEST_DEVICE", "cpu")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    model = load_model(
        get_spec("tiny-random-llama"),
        cache_dir=tmp_path_factory.mktemp("cache"),
        device=device,
        dtype=torch.float32,
    )
    assert isinstance(model, CausalLM)
    return model


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'genserve.sqlite'}"
    upgrade(url)
    return url


def _pg_connect():  # noqa: ANN202
    import psycopg

    return psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=3)


def create_pg_database() -> str:
    """A new, empty PostgreSQL database; returns its SQLAlchemy URL."""
    name = f"genserve_test_{secrets.token_hex(4)}"
    with _pg_connect() as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[-1]
    with _pg_connect() as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_available() -> None:
    try:
        with _pg_connect() as connection:
            connection.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any connection error means "not here"
        unavailable("PostgreSQL at 127.0.0.1:5432", exc)


@pytest.fixture
def empty_pg_url(postgres_available: None) -> Iterator[str]:
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture
def pg_url(empty_pg_url: str) -> str:
    upgrade(empty_pg_url)
    return empty_pg_url


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
        client.ping()
        client.flushdb()
    except Exception as exc:  # noqa: BLE001
        unavailable("Redis at 127.0.0.1:6379", exc)
    return REDIS_URL


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated database of each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'genserve.sqlite'}"
        upgrade(url)
        yield url
        return
    request.getfixturevalue("postgres_available")
    url = create_pg_database()
    try:
        upgrade(url)
        yield url
    finally:
        drop_pg_database(url)
