"""Tables of the store, as the latest migration leaves them. SQLAlchemy Core, so SQLite
and PostgreSQL share one schema; `store/migrations/` gets any older store here."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)

# In `meta`: what gpuprovider 0.1.0 reads to refuse a store newer than itself. Alembic's
# revision is what this code goes by; this number is bumped with any migration an older
# release must not open.
SCHEMA_VERSION = 5

metadata = MetaData()

meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

tokens = Table(
    "tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("scopes", JSON, nullable=False),
    Column("tenant", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float),  # refused from then on; NULL: never
    Column("revoked_at", Float),  # refused from then on (kept: who had access, when)
)

nodes = Table(
    "nodes",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("address", String(255), nullable=False),
    Column("backend", String(32), nullable=False),
    Column("labels", JSON, nullable=False),
    Column("status", String(16), nullable=False),
    Column("status_reason", Text, nullable=False, default=""),
    Column("cpu_count", Integer, nullable=False),
    Column("memory_mib", Integer, nullable=False),
    Column("disk_mib", Integer, nullable=False),
    Column("public_key", String(64), nullable=False, default=""),
    Column("facts", JSON, nullable=False),
    Column("last_heartbeat", Float, nullable=False),
    Column("prior_status", String(16)),  # while unreachable: the status it returns to
)

gpus = Table(
    "gpus",
    metadata,
    Column("uuid", String(96), primary_key=True),
    Column("node_id", String(64), ForeignKey("nodes.id"), nullable=False, index=True),
    Column("idx", Integer, nullable=False),
    Column("model", String(64), nullable=False),
    Column("device_name", String(128), nullable=False),
    Column("memory_mib", Integer, nullable=False),
    Column("memory_gb", Integer, nullable=False),
    Column("simulated", Boolean, nullable=False),
    Column("health", String(16), nullable=False),
    Column("health_reason", Text, nullable=False, default=""),
    Column("driver_version", String(32), nullable=False, default=""),
    Column("cuda_version", String(32), nullable=False, default=""),
    Column("present", Boolean, nullable=False, default=True),
    Column("cordon_reason", Text, nullable=False, default="", server_default=""),
)

tasks = Table(
    "tasks",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(64)),
    # The name while the task is live, NULL once it ends: unique among the tenant's
    # live tasks.
    Column("live_name", String(64)),
    Column("tenant", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("state", String(16), nullable=False, index=True),
    Column("state_reason", Text, nullable=False, default=""),
    Column("spec", JSON, nullable=False),
    Column("priority", Integer, nullable=False),
    Column("attempt", Integer, nullable=False, default=0),
    Column("preemptions", Integer, nullable=False, default=0),
    Column("gang", String(160)),  # tenant/name: members are placed and released together
    Column("not_before", Float, nullable=False, default=0.0),
    Column("queue_deadline", Float),
    Column("exit_code", Integer),
    Column("node_id", String(64)),
    Column("pid", Integer),
    Column("pid_start_time", Float),
    Column("run_dir", Text),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("version", Integer, nullable=False, default=0),
    # The client's Idempotency-Key of the submission: a retry gets this task back.
    Column("idempotency_key", String(255)),
    # A service's failures in a row that came soon after its start: its restart backoff.
    Column("crash_streak", Integer, nullable=False, default=0, server_default="0"),
    # What the task belongs to, if anything ("service": a replica; "lease": a market's
    # work): its owner's rule hears each transition, in the same transaction.
    Column("owner_kind", String(16)),
    Column("owner_id", String(64)),
    UniqueConstraint("tenant", "live_name", name="uq_tasks_tenant_live_name"),
    UniqueConstraint("tenant", "idempotency_key", name="uq_tasks_tenant_idempotency_key"),
)
Index("ix_tasks_name", tasks.c.name)
Index("ix_tasks_created_at", tasks.c.created_at)
# one tenant's tasks, newest first (the dashboard's task list), as a range of the index;
# and a tenant's task by name, so that SQLite never looks that up through the first
Index("ix_tasks_tenant_created_at", tasks.c.tenant, tasks.c.created_at)
Index("ix_tasks_tenant_name", tasks.c.tenant, tasks.c.name)
Index("ix_tasks_gang", tasks.c.gang)
Index("ix_tasks_owner", tasks.c.owner_id, tasks.c.owner_kind)

allocations = Table(
    "allocations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("task_id", String(32), ForeignKey("tasks.id"), nullable=False, index=True),
    Column("attempt", Integer, nullable=False),
    Column("node_id", String(64), nullable=False),
    Column("gpu_uuids", JSON, nullable=False),
    Column("gpu_milli", Integer, nullable=False),
    Column("cpu_milli", Integer, nullable=False),
    Column("memory_mib", Integer, nullable=False),
    Column("ports", JSON, nullable=False),
    Column("over_quota", Boolean, nullable=False, default=False),
    Column("active", Boolean, nullable=False, index=True),
    Column("created_at", Float, nullable=False),
    Column("released_at", Float),
)

# Every transition of every aggregate (task, node, service, lease, ...), one row each,
# and notes of what changed without a change of state (from_state == to_state): the one
# feed the CLI, the API's /events and the dashboard follow, by `id` (the cursor).
journal = Table(
    "journal",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    Column("subject", String(64), nullable=False),
    Column("tenant", String(64), nullable=False, server_default=""),  # "": the provider's
    Column("at", Float, nullable=False),
    Column("from_state", String(24)),  # None: the aggregate was made
    Column("to_state", String(24), nullable=False),
    Column("reason", Text, nullable=False),
)
Index("ix_journal_subject", journal.c.subject, journal.c.kind)
Index("ix_journal_tenant", journal.c.tenant, journal.c.id)

# The latest proof-of-GPU verdict per GPU, signed by its verifier (`signed`: the verdict
# and signature as posted; verifier_key "" for verdicts stored before schema 6).
gpu_proofs = Table(
    "gpu_proofs",
    metadata,
    Column("gpu_uuid", String(96), primary_key=True),
    Column("node_id", String(64), nullable=False),
    Column("challenge_id", String(32), nullable=False),
    Column("passed", Boolean, nullable=False),
    Column("reason", Text, nullable=False),
    Column("figures", JSON, nullable=False),
    Column("verifier", String(255), nullable=False),  # the token that posted it
    Column("at", Float, nullable=False),
    Column("verifier_key", String(64), nullable=False, server_default=""),
    Column("model", String(64), nullable=False, server_default=""),
    Column("simulated", Boolean, nullable=False, server_default=false()),
    Column("covered_bytes", BigInteger, nullable=False, server_default="0"),
    Column("timed", Boolean, nullable=False, server_default=false()),
    Column("signed", JSON),
    # the proof protocol the verdict was given under; "" before schema 10: never counted
    Column("protocol", String(32), nullable=False, server_default=""),
)

# Every proof challenge id this provider has taken: a session never opens under one twice.
proof_challenges = Table(
    "proof_challenges",
    metadata,
    Column("challenge_id", String(32), primary_key=True),
    Column("gpu_uuid", String(96), nullable=False),
    Column("seen_at", Float, nullable=False),
)

# The latest result of each check on each node (`gpuprovider check`, preflight at `up`).
check_results = Table(
    "check_results",
    metadata,
    Column("node_id", String(64), primary_key=True),
    Column("key", String(200), primary_key=True),  # group/name[/subject]
    Column("group", String(32), nullable=False),
    Column("name", String(64), nullable=False),
    Column("subject", String(64), nullable=False),
    Column("gpu_uuid", String(96), nullable=False, index=True),
    Column("status", String(8), nullable=False),
    Column("value", JSON),
    Column("unit", String(32), nullable=False),
    Column("threshold", Text, nullable=False),
    Column("advice", Text, nullable=False),
    Column("data", JSON, nullable=False),
    Column("ran_at", Float, nullable=False),
)

# What repair rules did (or, in dry-run, would have done), and why: one row per action.
repair_events = Table(
    "repair_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("node_id", String(64), nullable=False, index=True),
    Column("gpu_uuid", String(96), nullable=False, default=""),  # empty: the node
    Column("rule", String(64), nullable=False),
    Column("signal", String(32), nullable=False),
    Column("action", String(32), nullable=False),
    Column("outcome", String(32), nullable=False),  # done, dry-run, breaker-open, failed, ...
    Column("detail", Text, nullable=False, default=""),
    Column("evidence", JSON, nullable=False),
)
Index("ix_repair_events_gpu_uuid", repair_events.c.gpu_uuid)

# GPU-seconds booked by tasks, and of those the ones sampled idle (utilisation 0), per
# UTC day, tenant and model (DLWS' booked/idle accounting).
gpu_usage = Table(
    "gpu_usage",
    metadata,
    Column("day", Integer, primary_key=True),  # days since 1970-01-01 UTC
    Column("tenant", String(64), primary_key=True),
    Column("model", String(64), primary_key=True),
    Column("booked_s", Float, nullable=False),
    Column("idle_s", Float, nullable=False),
)

# Services: a name (the first label of their host name, unique among live services of
# every tenant), the spec their replicas are made from, how many replicas are wanted.
services = Table(
    "services",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(63), nullable=False, index=True),
    Column("live_name", String(63), unique=True),  # the name while live, NULL once stopped
    Column("tenant", String(64), nullable=False),
    Column("spec", JSON, nullable=False),
    Column("replicas", Integer, nullable=False),  # wanted now (autoscale moves it)
    Column("next_replica", Integer, nullable=False),  # numbers replica names
    Column("state", String(16), nullable=False),  # ServiceState
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("owner_kind", String(16)),  # a lease's service: the lease hears its transitions
    Column("owner_id", String(64)),
    # replicas being drained (task id -> since when): the router sends them nothing new
    Column("draining", JSON, nullable=False, server_default="{}"),
)

# The provider's side of each market lease (migration 0007): the order as it came, what
# was decided and why, the task that realises it, and the usage chain sent so far.
market_leases = Table(
    "market_leases",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("market", String(64), nullable=False),
    Column("state", String(24), nullable=False),
    Column("order", JSON, nullable=False),
    Column("model", String(64), nullable=False, server_default=""),
    Column("price_per_hour", BigInteger, nullable=False, server_default="0"),
    Column("reason", Text, nullable=False, server_default=""),
    Column("task_id", String(32)),
    Column("endpoint", String(512), nullable=False, server_default=""),
    Column("running_since", Float),
    Column("ended_at", Float),
    Column("close_reason", String(32), nullable=False, server_default=""),
    Column("reported", String(24), nullable=False, server_default=""),  # what the hub knows
    Column("usage_seq", Integer, nullable=False, server_default="0"),
    Column("usage_hash", String(64), nullable=False, server_default=""),
    Column("usage_until", Float),
    Column("usage_gpu_seconds", Float, nullable=False, server_default="0"),
    # migration 0008: the requests its service served, as recorded, and where the count
    # stood at the last record ("<router started>:<its total>")
    Column("usage_requests", Integer, nullable=False, server_default="0"),
    Column("requests_mark", String(64), nullable=False, server_default=""),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    # migration 0009: the service that realises a service lease (its task is a replica)
    Column("service_id", String(32)),
)
Index("ix_market_leases_state", market_leases.c.market, market_leases.c.state)

# Where each market's event stream was read up to, and this provider's standing there.
market_cursors = Table(
    "market_cursors",
    metadata,
    Column("market", String(64), primary_key=True),
    Column("last_event", Integer, nullable=False, server_default="0"),
    Column("status", String(24), nullable=False, server_default=""),
    Column("status_reason", Text, nullable=False, server_default=""),
    Column("updated_at", Float, nullable=False),
)

# Nonces a push market's signed requests used (migration 0008), kept until they expire:
# a request replayed after a restart is still refused.
market_nonces = Table(
    "market_nonces",
    metadata,
    Column("market", String(64), primary_key=True),
    Column("nonce", String(64), primary_key=True),
    Column("expires_at", Float, nullable=False, index=True),
)

# Pipelines (migration 0011_pipelines): a pipeline, and one row per stage of it. A
# stage's task names the pipeline as its owner (tasks.owner_kind = 'pipeline').
pipelines = Table(
    "pipelines",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(64)),
    Column("tenant", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("state_reason", Text, nullable=False, server_default=""),
    Column("spec", JSON, nullable=False),
    Column("work_store", Text),
    Column("node_id", String(64)),
    Column("cleanup_task_id", String(32)),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("version", Integer, nullable=False, server_default="0"),
)
Index("ix_pipelines_tenant", pipelines.c.tenant, pipelines.c.state)

pipeline_stages = Table(
    "pipeline_stages",
    metadata,
    Column("id", String(48), primary_key=True),
    Column("pipeline_id", String(32), ForeignKey("pipelines.id"), nullable=False),
    Column("tenant", String(64), nullable=False),
    Column("name", String(32), nullable=False),
    Column("pool", String(32), nullable=False),
    Column("depth", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("state_reason", Text, nullable=False, server_default=""),
    Column("task_id", String(32)),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("level", String(16), nullable=False, server_default=""),
    Column("due_at", Float),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("updated_at", Float, nullable=False),
    Column("version", Integer, nullable=False, server_default="0"),
)
Index("ix_pipeline_stages_pipeline", pipeline_stages.c.pipeline_id)
Index("ix_pipeline_stages_task", pipeline_stages.c.task_id)
Index(
    "ix_pipeline_stages_pool",
    pipeline_stages.c.tenant,
    pipeline_stages.c.pool,
    pipeline_stages.c.state,
)
Index("ix_pipeline_stages_due", pipeline_stages.c.state, pipeline_stages.c.due_at)
# Rentals (migration 0011): environments tenants log in to over SSH. Their history is in
# the journal; `live_name` is the name while not deleted (NULL after), so a name is
# taken once at a time.
rentals = Table(
    "rentals",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(63), nullable=False, index=True),
    Column("live_name", String(63), unique=True),
    Column("tenant", String(64), nullable=False),
    Column("state", String(16), nullable=False),  # RentalState
    Column("state_reason", Text, nullable=False, server_default=""),
    Column("spec", JSON, nullable=False),
    Column("ssh_port", Integer),  # NULL once deleted: the port is free again
    Column("ports", JSON, nullable=False),  # name -> port
    Column("disk_path", Text, nullable=False),
    Column("host_key", Text, nullable=False),
    Column("node_id", String(64)),
    Column("task_id", String(32)),
    Column("starts", Integer, nullable=False, server_default="0"),
    Column("requested_at", Float, nullable=False),
    Column("ready_s", Float),
    Column("expires_at", Float),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    UniqueConstraint("ssh_port", name="uq_rentals_ssh_port"),
)
