"""Tenancy: task names unique per tenant (not across tenants), idempotency keys of
submissions, tokens that expire or are revoked; a service's crash streak (its restart
backoff). Schema 3.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # 0.1.0 declared live_name unique on its own: PostgreSQL named that constraint
    # itself, SQLite left it unnamed (batch mode names it by this convention to drop it
    # while it copies the table).
    postgres = op.get_bind().dialect.name == "postgresql"
    with op.batch_alter_table(
        "tasks", naming_convention={"uq": "uq_%(table_name)s_%(column_0_name)s"}
    ) as batch:
        batch.drop_constraint(
            "tasks_live_name_key" if postgres else "uq_tasks_live_name", type_="unique"
        )
        batch.add_column(sa.Column("idempotency_key", sa.String(255)))
        batch.add_column(sa.Column("crash_streak", sa.Integer, nullable=False, server_default="0"))
        batch.create_unique_constraint("uq_tasks_tenant_live_name", ["tenant", "live_name"])
        batch.create_unique_constraint(
            "uq_tasks_tenant_idempotency_key", ["tenant", "idempotency_key"]
        )
    op.add_column("tokens", sa.Column("expires_at", sa.Float))
    op.add_column("tokens", sa.Column("revoked_at", sa.Float))
    op.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
