"""The dashboard's task list: one tenant's tasks, newest first, read as a range of an
index on (tenant, created_at) instead of all its tasks sorted (a tenant's own list, and
an admin's filter by tenant). Schema 11.

Revision ID: 0011_dashboard
Revises: 0010
"""

from alembic import op

revision = "0011_dashboard"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_tenant_created_at", "tasks", ["tenant", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_tasks_tenant_created_at", table_name="tasks")
