"""The schema is made only by migrations: they apply and reverse on both backends, and
they match the ORM tables exactly."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from service.db.migrate import alembic_config, downgrade, upgrade
from service.db.session import make_engine
from service.db.tables import Base

TABLES = {
    "tenants",
    "api_keys",
    "conversations",
    "jobs",
    "generations",
    "embeddings",
    "embedding_deletions",
}


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _diff(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def test_upgrade_matches_tables_and_downgrade_reverses(db_url: str) -> None:
    # db_url is already at head (the fixture ran upgrade).
    assert TABLES <= _tables(db_url)
    assert _diff(db_url) == []
    head = ScriptDirectory.from_config(alembic_config(db_url)).get_current_head()
    assert head is not None
    downgrade(db_url, "-1")
    assert not (TABLES & _tables(db_url))
    upgrade(db_url)
    assert TABLES <= _tables(db_url)
