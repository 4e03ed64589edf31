"""Node status as a state machine: node events, the status an unreachable node returns
to, GPU cordons. gpuprovider 0.1.0 refuses the store from here on (schema 2).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("nodes", sa.Column("prior_status", sa.String(16)))
    op.add_column("gpus", sa.Column("cordon_reason", sa.Text, nullable=False, server_default=""))
    op.create_table(
        "node_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("node_id", sa.String(64), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("from_status", sa.String(16)),
        sa.Column("to_status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )
    op.create_index("ix_node_events_node_id", "node_events", ["node_id"])
    op.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")
