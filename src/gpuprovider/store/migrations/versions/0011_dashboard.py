"""The dashboard's task list: one tenant's tasks, newest first, read as a range of an
index on (tenant, created_at) instead of all its tasks sorted (a tenant's own list, and
an admin's filter by tenant). With it, an index on (tenant, name): without statistics
SQLite would otherwise look a tenant's task up by name through the first index, all
the tenant's tasks (25 ms instead of 0.4 at 100,000 tasks). Schema 11.

Revision ID: 0011_dashboard
Revises: 0011_rentals
"""

from alembic import op

revision = "0011_dashboard"
down_revision = "0011_rentals"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_tenant_created_at", "tasks", ["tenant", "created_at"])
    op.create_index("ix_tasks_tenant_name", "tasks", ["tenant", "name"])


def downgrade() -> None:
    op.drop_index("ix_tasks_tenant_name", table_name="tasks")
    op.drop_index("ix_tasks_tenant_created_at", table_name="tasks")
