"""keyword search, tenant in the deletion log, feedback score

Keyword search is kept in step with the generations table by the database itself, so
every writer (the workers, a script, a restore) keeps it current:

- PostgreSQL: prompt_tsv and output_tsv, stored generated tsvector columns ('english'
  configuration) with GIN indexes.
- SQLite: an FTS5 table over prompt and output (porter stemming) whose content is the
  generations table, keyed by generations.search_rowid, an integer the insert trigger
  assigns (a table without an INTEGER PRIMARY KEY may renumber its rowids on VACUUM, so
  they cannot be the key). Triggers keep it in step on insert, update and delete.

A later migration that rebuilds the generations table on SQLite (batch mode) drops these
triggers with it and must create them again (service/search/keyword.py checks they exist).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQLITE_UP = [
    "ALTER TABLE generations ADD COLUMN search_rowid INTEGER",
    "CREATE UNIQUE INDEX ix_generations_search_rowid ON generations (search_rowid)",
    """CREATE VIRTUAL TABLE generations_fts USING fts5(
        prompt, output,
        content='generations', content_rowid='search_rowid',
        tokenize='porter unicode61 remove_diacritics 2'
    )""",
    """CREATE TRIGGER generations_fts_insert AFTER INSERT ON generations BEGIN
        UPDATE generations
           SET search_rowid = (SELECT coalesce(max(search_rowid), 0) + 1 FROM generations)
         WHERE id = new.id;
        INSERT INTO generations_fts (rowid, prompt, output)
             SELECT search_rowid, prompt, output FROM generations WHERE id = new.id;
    END""",
    """CREATE TRIGGER generations_fts_delete AFTER DELETE ON generations
       WHEN old.search_rowid IS NOT NULL BEGIN
        INSERT INTO generations_fts (generations_fts, rowid, prompt, output)
             VALUES ('delete', old.search_rowid, old.prompt, old.output);
    END""",
    """CREATE TRIGGER generations_fts_update AFTER UPDATE OF prompt, output ON generations
       WHEN old.search_rowid IS NOT NULL BEGIN
        INSERT INTO generations_fts (generations_fts, rowid, prompt, output)
             VALUES ('delete', old.search_rowid, old.prompt, old.output);
        INSERT INTO generations_fts (rowid, prompt, output)
             VALUES (new.search_rowid, new.prompt, new.output);
    END""",
    # Rows written before this migration: number them, then index them all.
    """UPDATE generations SET search_rowid = (
        SELECT count(*) FROM generations AS earlier WHERE earlier.id <= generations.id
    )""",
    "INSERT INTO generations_fts (generations_fts) VALUES ('rebuild')",
]

SQLITE_DOWN = [
    "DROP TRIGGER generations_fts_update",
    "DROP TRIGGER generations_fts_delete",
    "DROP TRIGGER generations_fts_insert",
    "DROP TABLE generations_fts",
    "DROP INDEX ix_generations_search_rowid",
    "ALTER TABLE generations DROP COLUMN search_rowid",
]

POSTGRES_UP = [
    """ALTER TABLE generations
        ADD COLUMN prompt_tsv tsvector
            GENERATED ALWAYS AS (to_tsvector('english'::regconfig, prompt)) STORED,
        ADD COLUMN output_tsv tsvector
            GENERATED ALWAYS AS (to_tsvector('english'::regconfig, output)) STORED""",
    "CREATE INDEX ix_generations_prompt_tsv ON generations USING gin (prompt_tsv)",
    "CREATE INDEX ix_generations_output_tsv ON generations USING gin (output_tsv)",
]

POSTGRES_DOWN = [
    "DROP INDEX ix_generations_output_tsv",
    "DROP INDEX ix_generations_prompt_tsv",
    "ALTER TABLE generations DROP COLUMN output_tsv, DROP COLUMN prompt_tsv",
]


def upgrade() -> None:
    op.add_column("embedding_deletions", sa.Column("tenant_id", sa.BigInteger(), nullable=True))
    op.add_column("generations", sa.Column("feedback_score", sa.Float(), nullable=True))
    op.add_column(
        "generations",
        sa.Column("feedback_count", sa.Integer(), server_default="0", nullable=False),
    )
    dialect = op.get_bind().dialect.name
    for statement in SQLITE_UP if dialect == "sqlite" else POSTGRES_UP:
        op.execute(statement)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for statement in SQLITE_DOWN if dialect == "sqlite" else POSTGRES_DOWN:
        op.execute(statement)
    with op.batch_alter_table("generations") as batch_op:
        batch_op.drop_column("feedback_count")
        batch_op.drop_column("feedback_score")
    with op.batch_alter_table("embedding_deletions") as batch_op:
        batch_op.drop_column("tenant_id")
