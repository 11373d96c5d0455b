"""the classic families: a model registry, training jobs and their progress, synthetic files

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JsonDoc = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    # Real (uploaded) and synthetic (generated) data never mix: the kind is a column.
    op.add_column("files", sa.Column("kind", sa.String(16), server_default="real", nullable=False))
    op.add_column("files", sa.Column("media_type", sa.String(64), nullable=True))
    op.add_column("files", sa.Column("generation_id", sa.String(40), nullable=True))
    op.add_column("files", sa.Column("metadata", JsonDoc, nullable=True))
    op.create_index("ix_files_generation", "files", ["generation_id"])
    op.create_index("ix_files_tenant_kind", "files", ["tenant_id", "kind", "id"])

    op.create_table(
        "model_versions",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        # NULL: a model that ships with genserve, served to every tenant.
        sa.Column("tenant_id", BigId, nullable=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("family", sa.String(32), nullable=False),
        sa.Column("config", JsonDoc, nullable=False),
        sa.Column("dataset_file_id", sa.String(40), nullable=True),
        sa.Column("dataset_sha256", sa.String(64), nullable=False),
        sa.Column("metrics", JsonDoc, nullable=False),
        sa.Column("artifact_path", sa.String(1024), nullable=False),
        sa.Column("artifact_sha256", sa.String(64), nullable=False),
        sa.Column("parent_version", sa.Integer(), nullable=True),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("training_job_id", sa.String(40), nullable=True),
        sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "name", "version", name="uq_model_versions_name"),
    )
    op.create_index("ix_model_versions_name", "model_versions", ["name", "version"])
    op.create_table(
        "training_jobs",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("tenant_id", BigId, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("arch", sa.String(32), nullable=False),
        sa.Column("dataset_file_id", sa.String(40), nullable=False),
        sa.Column("config", JsonDoc, nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("parent_version", sa.Integer(), nullable=True),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("progress", JsonDoc, nullable=False),
        sa.Column("metadata", JsonDoc, nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("publish_count", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_training_jobs_tenant_created", "training_jobs", ["tenant_id", "id"])
    op.create_index("ix_training_jobs_status", "training_jobs", ["status", "published_at"])
    op.create_table(
        "training_events",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("training_job_id", sa.String(40), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("data", JsonDoc, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["training_job_id"], ["training_jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_training_events_job", "training_events", ["training_job_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_training_events_job", table_name="training_events")
    op.drop_table("training_events")
    op.drop_index("ix_training_jobs_status", table_name="training_jobs")
    op.drop_index("ix_training_jobs_tenant_created", table_name="training_jobs")
    op.drop_table("training_jobs")
    op.drop_index("ix_model_versions_name", table_name="model_versions")
    op.drop_table("model_versions")
    op.drop_index("ix_files_tenant_kind", table_name="files")
    op.drop_index("ix_files_generation", table_name="files")
    with op.batch_alter_table("files") as batch_op:
        for column in ("metadata", "generation_id", "media_type", "kind"):
            batch_op.drop_column(column)
