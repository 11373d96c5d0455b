"""retrieval-augmented generation: collections, documents, chunks, their embeddings and
full-text search, the passages each grounded generation was given, jobs' context

Keyword search over chunks is kept in step by the database, as for generations (0002):
PostgreSQL a stored generated tsvector with a GIN index; SQLite an FTS5 table whose
content is the chunks table, keyed by chunks.id (an INTEGER PRIMARY KEY AUTOINCREMENT,
stable across VACUUM), kept current by triggers.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JsonDoc = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
Stamp = sa.DateTime(timezone=True)

SQLITE_UP = [
    """CREATE VIRTUAL TABLE chunks_fts USING fts5(
        text, content='chunks', content_rowid='id',
        tokenize='porter unicode61 remove_diacritics 2'
    )""",
    """CREATE TRIGGER chunks_fts_insert AFTER INSERT ON chunks BEGIN
        INSERT INTO chunks_fts (rowid, text) VALUES (new.id, new.text);
    END""",
    """CREATE TRIGGER chunks_fts_delete AFTER DELETE ON chunks BEGIN
        INSERT INTO chunks_fts (chunks_fts, rowid, text) VALUES ('delete', old.id, old.text);
    END""",
    """CREATE TRIGGER chunks_fts_update AFTER UPDATE OF text ON chunks BEGIN
        INSERT INTO chunks_fts (chunks_fts, rowid, text) VALUES ('delete', old.id, old.text);
        INSERT INTO chunks_fts (rowid, text) VALUES (new.id, new.text);
    END""",
]
SQLITE_DOWN = [
    "DROP TRIGGER chunks_fts_update",
    "DROP TRIGGER chunks_fts_delete",
    "DROP TRIGGER chunks_fts_insert",
    "DROP TABLE chunks_fts",
]
POSTGRES_UP = [
    """ALTER TABLE chunks ADD COLUMN text_tsv tsvector
        GENERATED ALWAYS AS (to_tsvector('english'::regconfig, text)) STORED""",
    "CREATE INDEX ix_chunks_text_tsv ON chunks USING gin (text_tsv)",
]
POSTGRES_DOWN = ["DROP INDEX ix_chunks_text_tsv", "ALTER TABLE chunks DROP COLUMN text_tsv"]


def upgrade() -> None:
    op.add_column("jobs", sa.Column("context", JsonDoc, nullable=True))
    op.create_table(
        "collections",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column(
            "tenant_id",
            BigId,
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("embedding_model", sa.String(128), nullable=False),
        sa.Column("chunk_tokens", sa.Integer(), nullable=False),
        sa.Column("chunk_overlap", sa.Integer(), nullable=False),
        sa.Column("metadata", JsonDoc, nullable=False),
        sa.Column("created_at", Stamp, nullable=False),
        sa.UniqueConstraint("tenant_id", "name", name="uq_collections_name"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "documents",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "tenant_id",
            BigId,
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "collection_id",
            BigId,
            sa.ForeignKey("collections.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("external_id", sa.String(512), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("filename", sa.String(255), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("metadata", JsonDoc, nullable=False),
        sa.Column("chunk_count", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(40), nullable=True),
        sa.Column("created_at", Stamp, nullable=False),
        sa.Column("updated_at", Stamp, nullable=False),
        sa.UniqueConstraint("collection_id", "external_id", name="uq_documents_external_id"),
    )
    op.create_index("ix_documents_collection_created", "documents", ["collection_id", "id"])
    op.create_table(
        "chunks",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column(
            "tenant_id",
            BigId,
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "collection_id",
            BigId,
            sa.ForeignKey("collections.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "document_id",
            sa.String(40),
            sa.ForeignKey("documents.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("start", sa.Integer(), nullable=False),
        sa.Column("end", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("created_at", Stamp, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_chunks_document", "chunks", ["document_id", "seq"])
    op.create_index("ix_chunks_collection_id", "chunks", ["collection_id"])
    op.create_table(
        "chunk_embeddings",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column(
            "collection_id",
            BigId,
            sa.ForeignKey("collections.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "chunk_id",
            BigId,
            sa.ForeignKey("chunks.id", ondelete="CASCADE"),
            nullable=False,
            unique=True,
        ),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("dimension", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", Stamp, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_chunk_embeddings_model_id", "chunk_embeddings", ["model", "id"])
    op.create_table(
        "chunk_embedding_deletions",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("embedding_id", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("collection_id", sa.BigInteger(), nullable=True),
        sa.Column("deleted_at", Stamp, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_chunk_embedding_deletions_model_id", "chunk_embedding_deletions", ["model", "id"]
    )
    op.create_table(
        "generation_sources",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column(
            "generation_id",
            sa.String(40),
            sa.ForeignKey("generations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("scores", JsonDoc, nullable=False),
        sa.Column("collection_id", sa.BigInteger(), nullable=True),
        sa.Column("document_id", sa.String(40), nullable=True),
        sa.Column("chunk_id", sa.BigInteger(), nullable=True),
        sa.Column("source_generation_id", sa.String(40), nullable=True),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("cited", sa.Boolean(), nullable=False),
    )
    op.create_index(
        "ix_generation_sources_generation", "generation_sources", ["generation_id", "number"]
    )
    dialect = op.get_bind().dialect.name
    for statement in SQLITE_UP if dialect == "sqlite" else POSTGRES_UP:
        op.execute(statement)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for statement in SQLITE_DOWN if dialect == "sqlite" else POSTGRES_DOWN:
        op.execute(statement)
    op.drop_table("generation_sources")
    op.drop_table("chunk_embedding_deletions")
    op.drop_table("chunk_embeddings")
    op.drop_table("chunks")
    op.drop_table("documents")
    op.drop_table("collections")
    # Plain DROP COLUMN (SQLite >= 3.35): a batch copy of jobs would cascade-delete.
    op.drop_column("jobs", "context")
