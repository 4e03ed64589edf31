"""Work from markets: the provider's side of each lease, and each market's cursor.
Schema 7.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "market_leases",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("market", sa.String(64), nullable=False, index=True),
        sa.Column("state", sa.String(24), nullable=False),
        sa.Column("order", sa.JSON, nullable=False),
        sa.Column("model", sa.String(64), nullable=False, server_default=""),
        sa.Column("price_per_hour", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
        sa.Column("task_id", sa.String(32)),
        sa.Column("endpoint", sa.String(512), nullable=False, server_default=""),
        sa.Column("running_since", sa.Float),
        sa.Column("ended_at", sa.Float),
        sa.Column("close_reason", sa.String(32), nullable=False, server_default=""),
        sa.Column("reported", sa.String(24), nullable=False, server_default=""),
        sa.Column("usage_seq", sa.Integer, nullable=False, server_default="0"),
        sa.Column("usage_hash", sa.String(64), nullable=False, server_default=""),
        sa.Column("usage_until", sa.Float),
        sa.Column("usage_gpu_seconds", sa.Float, nullable=False, server_default="0"),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "market_cursors",
        sa.Column("market", sa.String(64), primary_key=True),
        sa.Column("last_event", sa.Integer, nullable=False, server_default="0"),
        sa.Column("status", sa.String(24), nullable=False, server_default=""),
        sa.Column("status_reason", sa.Text, nullable=False, server_default=""),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("market_cursors")
    op.drop_table("market_leases")
