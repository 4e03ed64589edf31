"""The nonces of a push market's signed requests, so a replay is refused across
restarts; and the requests a lease's service served. Schema 8.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "market_nonces",
        sa.Column("market", sa.String(64), primary_key=True),
        sa.Column("nonce", sa.String(64), primary_key=True),
        sa.Column("expires_at", sa.Float, nullable=False, index=True),
    )
    with op.batch_alter_table("market_leases") as batch:
        batch.add_column(
            sa.Column("usage_requests", sa.Integer, nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("requests_mark", sa.String(64), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("market_leases") as batch:
        batch.drop_column("requests_mark")
        batch.drop_column("usage_requests")
    op.drop_table("market_nonces")
