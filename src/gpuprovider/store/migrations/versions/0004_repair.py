"""Watch and repair: what repair rules did, and booked/idle GPU-seconds. Schema 4.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "repair_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("node_id", sa.String(64), nullable=False),
        sa.Column("gpu_uuid", sa.String(96), nullable=False),
        sa.Column("rule", sa.String(64), nullable=False),
        sa.Column("signal", sa.String(32), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("evidence", sa.JSON, nullable=False),
    )
    op.create_index("ix_repair_events_node_id", "repair_events", ["node_id"])
    op.create_index("ix_repair_events_gpu_uuid", "repair_events", ["gpu_uuid"])
    op.create_table(
        "gpu_usage",
        sa.Column("day", sa.Integer, primary_key=True),
        sa.Column("tenant", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(64), primary_key=True),
        sa.Column("booked_s", sa.Float, nullable=False),
        sa.Column("idle_s", sa.Float, nullable=False),
    )
    op.execute("UPDATE meta SET value = '4' WHERE key = 'schema'")
