"""jobs indexed by tenant, api and id: the listings of one API's jobs (exports, stored chat
completions) read only that API's jobs, newest first, however many others the tenant has

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_jobs_tenant_api", "jobs", ["tenant_id", "api", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_tenant_api", table_name="jobs")
