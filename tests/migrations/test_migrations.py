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
from service.search.keyword import KEYWORD_COLUMNS, KEYWORD_INDEXES, KEYWORD_TABLE_PREFIXES

TABLES = {
    "tenants",
    "api_keys",
    "conversations",
    "jobs",
    "generations",
    "embeddings",
    "embedding_deletions",
    "files",
    "file_chunks",
    "batches",
    "model_versions",
    "training_jobs",
    "training_events",
    "tenant_usage",
    "audit_events",
}


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _outside_the_orm(obj: object, name: str | None, type_: str, *_: object) -> bool:
    """The keyword-search objects of migrations 0002 and 0006, and the tag index of 0007,
    are per dialect, not in the ORM."""
    if type_ == "table":
        return not (name or "").startswith(KEYWORD_TABLE_PREFIXES)
    if type_ == "column":
        return name not in KEYWORD_COLUMNS
    return not (type_ == "index" and name in (*KEYWORD_INDEXES, "ix_generations_tags"))


def _diff(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            opts = {"compare_type": True, "include_object": _outside_the_orm}
            context = MigrationContext.configure(connection, opts=opts)
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def test_upgrade_matches_tables_and_downgrade_reverses(db_url: str) -> None:
    # db_url is already at head (the fixture ran upgrade).
    assert TABLES <= _tables(db_url)
    assert _diff(db_url) == []
    head = ScriptDirectory.from_config(alembic_config(db_url)).get_current_head()
    assert head is not None
    downgrade(db_url, "base")
    assert not (TABLES & _tables(db_url))
    upgrade(db_url)
    assert TABLES <= _tables(db_url)
