"""the data of generation: feedback, evaluation sets and runs, the response cache's keys,
usage rolled up per day, the calling key on jobs, and indexes for the history's filters

Usage is kept as daily rollups (usage_rollups), one row per tenant, day, key, model and
latency bucket, so /v1/usage and the trends read a few rows per day however many
requests there were, and percentiles come from the bucket counts.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JsonDoc = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
Stamp = sa.DateTime(timezone=True)

# A tag filter is `metadata -> 'tags' @> '["x"]'`; this index answers it on PostgreSQL.
POSTGRES_UP = [
    "CREATE INDEX ix_generations_tags ON generations USING gin ((metadata -> 'tags'))",
]
POSTGRES_DOWN = ["DROP INDEX ix_generations_tags"]

COUNTERS = (
    "requests",
    "succeeded",
    "failed",
    "cancelled",
    "cache_hits",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "time_saved_ms",
    "refusals",
    "feedback_count",
)


def _tenant() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(
        "tenant_id", BigId, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
    )


def upgrade() -> None:
    # Plain ADD COLUMN (never a batch copy of jobs or generations on SQLite: see 0005).
    op.add_column("jobs", sa.Column("api_key_id", sa.BigInteger(), nullable=True))
    for table in ("jobs", "generations"):
        op.add_column(table, sa.Column("cache_key", sa.String(64), nullable=True))
        op.add_column(table, sa.Column("cache_scope", sa.String(64), nullable=True))
    op.create_index("ix_generations_cache_key", "generations", ["tenant_id", "cache_key"])
    op.create_index("ix_generations_tenant_model", "generations", ["tenant_id", "model", "id"])
    op.create_index(
        "ix_generations_tenant_feedback", "generations", ["tenant_id", "feedback_score", "id"]
    )

    op.create_table(
        "generation_feedback",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        _tenant(),
        sa.Column(
            "generation_id",
            sa.String(40),
            sa.ForeignKey("generations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("label", sa.String(64), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("user_name", sa.String(128), nullable=True),
        sa.Column("api_key_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at", Stamp, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_generation_feedback_generation", "generation_feedback", ["generation_id", "id"]
    )
    op.create_index(
        "ix_generation_feedback_label",
        "generation_feedback",
        ["tenant_id", "label", "generation_id"],
    )

    op.create_table(
        "usage_rollups",
        _tenant(),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("api_key_id", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("bucket", sa.SmallInteger(), nullable=False),
        *(
            sa.Column(name, sa.BigInteger(), server_default="0", nullable=False)
            for name in COUNTERS
        ),
        sa.Column("feedback_sum", sa.Float(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "day", "api_key_id", "model", "bucket"),
    )

    op.create_table(
        "eval_sets",
        sa.Column("id", sa.String(40), primary_key=True),
        _tenant(),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("metadata", JsonDoc, nullable=False),
        sa.Column("item_count", sa.Integer(), nullable=False),
        sa.Column("created_at", Stamp, nullable=False),
        sa.UniqueConstraint("tenant_id", "name", name="uq_eval_sets_name"),
    )
    op.create_table(
        "eval_items",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column(
            "set_id",
            sa.String(40),
            sa.ForeignKey("eval_sets.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("input", JsonDoc, nullable=False),
        sa.Column("reference", sa.Text(), nullable=False),
        sa.Column("metadata", JsonDoc, nullable=False),
        sa.UniqueConstraint("set_id", "seq", name="uq_eval_items_seq"),
    )
    op.create_table(
        "eval_runs",
        sa.Column("id", sa.String(40), primary_key=True),
        _tenant(),
        sa.Column(
            "set_id",
            sa.String(40),
            sa.ForeignKey("eval_sets.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("params", JsonDoc, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("aggregates", JsonDoc, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("metadata", JsonDoc, nullable=False),
        sa.Column("created_at", Stamp, nullable=False),
        sa.Column("finished_at", Stamp, nullable=True),
    )
    op.create_index("ix_eval_runs_tenant_created", "eval_runs", ["tenant_id", "id"])
    op.create_table(
        "eval_results",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column(
            "run_id",
            sa.String(40),
            sa.ForeignKey("eval_runs.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("item_id", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(40), nullable=True),
        sa.Column("generation_id", sa.String(40), nullable=True),
        sa.Column("output", sa.Text(), nullable=True),
        sa.Column("scores", JsonDoc, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", Stamp, nullable=False),
        sa.UniqueConstraint("run_id", "item_id", name="uq_eval_results_item"),
    )
    if op.get_bind().dialect.name == "postgresql":
        for statement in POSTGRES_UP:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in POSTGRES_DOWN:
            op.execute(statement)
    op.drop_table("eval_results")
    op.drop_table("eval_runs")
    op.drop_table("eval_items")
    op.drop_table("eval_sets")
    op.drop_table("usage_rollups")
    op.drop_table("generation_feedback")
    op.drop_index("ix_generations_tenant_feedback", "generations")
    op.drop_index("ix_generations_tenant_model", "generations")
    op.drop_index("ix_generations_cache_key", "generations")
    for table in ("generations", "jobs"):
        op.drop_column(table, "cache_scope")
        op.drop_column(table, "cache_key")
    op.drop_column("jobs", "api_key_id")
