"""Proof-of-GPU verdicts signed by their verifier, with what they covered. Schema 6.

Verdicts stored before (protocol v1, posted by any token with the verify scope) are
kept, with no verifier key: shown, never counted by `[proof] required`.

Revision ID: 0006
Revises: 0005
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

COLUMNS: list[sa.Column[Any]] = [
    sa.Column("verifier_key", sa.String(64), nullable=False, server_default=""),
    sa.Column("model", sa.String(64), nullable=False, server_default=""),
    sa.Column("simulated", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("covered_bytes", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("timed", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("signed", sa.JSON),
]


def upgrade() -> None:
    with op.batch_alter_table("gpu_proofs") as batch:
        for column in COLUMNS:
            batch.add_column(column)


def downgrade() -> None:
    with op.batch_alter_table("gpu_proofs") as batch:
        for column in COLUMNS:
            batch.drop_column(column.name)
