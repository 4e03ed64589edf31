"""One journal for every aggregate's transitions (tasks, nodes, services, leases), made
from the three event tables it replaces; tasks and services name their owner; a
service lease names its service. Schema 9.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# The three event tables' rows in the order they were written (by time, then by table
# and row), as journal rows. A service event was a note of a decision, not a change of
# state: it becomes a note (from == to), except a stop.
_CONVERT = """
INSERT INTO journal (kind, subject, tenant, at, from_state, to_state, reason)
SELECT kind, subject, tenant, at, from_state, to_state, reason FROM (
  SELECT 'task' AS kind, e.task_id AS subject, t.tenant AS tenant, e.at AS at,
         e.from_state AS from_state, e.to_state AS to_state, e.reason AS reason,
         0 AS source, e.id AS source_id
    FROM events e JOIN tasks t ON t.id = e.task_id
  UNION ALL
  SELECT 'node', n.node_id, '', n.at, n.from_status, n.to_status, n.reason, 1, n.id
    FROM node_events n
  UNION ALL
  SELECT 'service', s.service_id, COALESCE(v.tenant, ''), s.at,
         'live',
         CASE WHEN s.reason LIKE 'stopped by %' THEN 'stopped' ELSE 'live' END,
         s.reason, 2, s.id
    FROM service_events s LEFT JOIN services v ON v.id = s.service_id
) AS old
ORDER BY at, source, source_id
"""


def upgrade() -> None:
    op.create_table(
        "journal",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False, server_default=""),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("from_state", sa.String(24)),
        sa.Column("to_state", sa.String(24), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )
    op.execute(_CONVERT)
    op.create_index("ix_journal_subject", "journal", ["subject", "kind"])
    op.create_index("ix_journal_tenant", "journal", ["tenant", "id"])
    op.drop_table("events")
    op.drop_table("node_events")
    op.drop_table("service_events")

    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("owner_kind", sa.String(16)))
        batch.add_column(sa.Column("owner_id", sa.String(64)))
    op.execute(
        "UPDATE tasks SET owner_kind = 'service', owner_id = service_id "
        "WHERE service_id IS NOT NULL"
    )
    with op.batch_alter_table("tasks") as batch:
        batch.drop_index("ix_tasks_service_id")
        batch.drop_column("service_id")
        batch.create_index("ix_tasks_owner", ["owner_id", "owner_kind"])

    with op.batch_alter_table("services") as batch:
        batch.add_column(sa.Column("owner_kind", sa.String(16)))
        batch.add_column(sa.Column("owner_id", sa.String(64)))
        batch.add_column(sa.Column("draining", sa.JSON, nullable=False, server_default="{}"))

    with op.batch_alter_table("market_leases") as batch:
        batch.add_column(sa.Column("service_id", sa.String(32)))
        batch.drop_index("ix_market_leases_market")
        batch.create_index("ix_market_leases_state", ["market", "state"])
    # a lease's service, where its task was a replica
    op.execute(
        "UPDATE market_leases SET service_id = "
        "(SELECT owner_id FROM tasks WHERE tasks.id = market_leases.task_id "
        "AND tasks.owner_kind = 'service') WHERE task_id IS NOT NULL"
    )
    op.execute(
        "UPDATE services SET owner_kind = 'lease', owner_id = "
        "(SELECT id FROM market_leases WHERE market_leases.service_id = services.id) "
        "WHERE id IN (SELECT service_id FROM market_leases WHERE service_id IS NOT NULL)"
    )
    op.execute(
        "UPDATE tasks SET owner_kind = 'lease', owner_id = "
        "(SELECT id FROM market_leases WHERE market_leases.task_id = tasks.id) "
        "WHERE owner_kind IS NULL AND id IN "
        "(SELECT task_id FROM market_leases WHERE task_id IS NOT NULL)"
    )
