"""Proof of GPU v3: every challenge id a provider has taken, so none opens a session twice
(an expired verdict could be revived under its old id); the protocol version of each
stored verdict, so one proved under an older protocol does not count. Schema 10.

Ids of verdicts already stored are recorded as used; those verdicts keep protocol "" and
are shown, never counted.

Revision ID: 0010
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
# the lead's journal migration takes 0009; until it lands on main this follows 0008
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "proof_challenges",
        sa.Column("challenge_id", sa.String(32), primary_key=True),
        sa.Column("gpu_uuid", sa.String(96), nullable=False),
        sa.Column("seen_at", sa.Float, nullable=False),
    )
    with op.batch_alter_table("gpu_proofs") as batch:
        batch.add_column(sa.Column("protocol", sa.String(32), nullable=False, server_default=""))
    op.execute(
        "INSERT INTO proof_challenges (challenge_id, gpu_uuid, seen_at) "
        "SELECT challenge_id, gpu_uuid, at FROM gpu_proofs"
    )


def downgrade() -> None:
    with op.batch_alter_table("gpu_proofs") as batch:
        batch.drop_column("protocol")
    op.drop_table("proof_challenges")
