"""Multi-stage pipelines: a pipeline and one row per stage; a stage's task names the
pipeline as its owner. Schema 11.

Revision ID: 0011_pipelines
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_pipelines"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pipelines",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(64)),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("state_reason", sa.Text, nullable=False, server_default=""),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("work_store", sa.Text),
        sa.Column("node_id", sa.String(64)),
        sa.Column("cleanup_task_id", sa.String(32)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float),
        sa.Column("version", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_index("ix_pipelines_tenant", "pipelines", ["tenant", "state"])
    op.create_table(
        "pipeline_stages",
        sa.Column("id", sa.String(48), primary_key=True),
        sa.Column("pipeline_id", sa.String(32), sa.ForeignKey("pipelines.id"), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("pool", sa.String(32), nullable=False),
        sa.Column("depth", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("state_reason", sa.Text, nullable=False, server_default=""),
        sa.Column("task_id", sa.String(32)),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("level", sa.String(16), nullable=False, server_default=""),
        sa.Column("due_at", sa.Float),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("version", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_index("ix_pipeline_stages_pipeline", "pipeline_stages", ["pipeline_id"])
    op.create_index("ix_pipeline_stages_task", "pipeline_stages", ["task_id"])
    op.create_index("ix_pipeline_stages_pool", "pipeline_stages", ["tenant", "pool", "state"])
    op.create_index("ix_pipeline_stages_due", "pipeline_stages", ["state", "due_at"])
