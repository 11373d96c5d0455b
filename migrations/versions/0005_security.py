"""security: key expiry and rate limits, tenant quotas and redaction, usage counters, audit log

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JsonDoc = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    # Plain ADD COLUMN on both backends. Never a batch (copy and swap) of these tables on
    # SQLite: dropping the old tenants table with foreign keys on would cascade-delete
    # every row that refers to it.
    op.add_column("api_keys", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    # Requests per minute; NULL takes the tenant's, then the server's default.
    op.add_column("api_keys", sa.Column("rate_limit_per_minute", sa.Integer(), nullable=True))
    op.add_column(
        "tenants", sa.Column("redact_pii", sa.Boolean(), server_default=sa.false(), nullable=False)
    )
    op.add_column("tenants", sa.Column("rate_limit_per_minute", sa.Integer(), nullable=True))
    op.add_column("tenants", sa.Column("requests_per_day", sa.Integer(), nullable=True))
    op.add_column("tenants", sa.Column("tokens_per_day", sa.BigInteger(), nullable=True))

    # One row per tenant and UTC day, counted in the transactions that create jobs and
    # store generations: quotas read one row, and usage reports sum a few.
    op.create_table(
        "tenant_usage",
        sa.Column(
            "tenant_id", BigId, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("requests", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "day"),
    )

    # No foreign key: the record of a deletion outlives what was deleted, tenants included.
    op.create_table(
        "audit_events",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.BigInteger(), nullable=True),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("actor_key_id", sa.BigInteger(), nullable=True),
        sa.Column("actor_role", sa.String(16), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(128), nullable=True),
        sa.Column("detail", JsonDoc, nullable=True),
        sa.Column("request_id", sa.String(32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_audit_events_tenant_id", "audit_events", ["tenant_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_audit_events_tenant_id", table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_table("tenant_usage")
    # SQLite 3.35 and newer drop a column in place, as PostgreSQL does (no copy and swap).
    for table, column in (
        ("tenants", "tokens_per_day"),
        ("tenants", "requests_per_day"),
        ("tenants", "rate_limit_per_minute"),
        ("tenants", "redact_pii"),
        ("api_keys", "rate_limit_per_minute"),
        ("api_keys", "expires_at"),
    ):
        op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
