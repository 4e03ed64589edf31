"""Rentals: environments tenants log in to over SSH, with a persistent disk and ports on
stable numbers. Their transitions are in the journal.

Revision ID: 0011_rentals
Revises: 0011_pipelines
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_rentals"
down_revision = "0011_pipelines"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rentals",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False, index=True),
        sa.Column("live_name", sa.String(63), unique=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("state_reason", sa.Text, nullable=False, server_default=""),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("ssh_port", sa.Integer),
        sa.Column("ports", sa.JSON, nullable=False),
        sa.Column("disk_path", sa.Text, nullable=False),
        sa.Column("host_key", sa.Text, nullable=False),
        sa.Column("node_id", sa.String(64)),
        sa.Column("task_id", sa.String(32)),
        sa.Column("starts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("requested_at", sa.Float, nullable=False),
        sa.Column("ready_s", sa.Float),
        sa.Column("expires_at", sa.Float),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.UniqueConstraint("ssh_port", name="uq_rentals_ssh_port"),
    )


def downgrade() -> None:
    op.drop_table("rentals")
