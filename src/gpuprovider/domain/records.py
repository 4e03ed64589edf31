"""The domain's records: tasks, their allocations and events, nodes, GPUs, tokens.
Plain dataclasses; the store reads and writes them."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any

from gpuprovider.domain.nodes import NodeStatus
from gpuprovider.domain.services import ServiceState
from gpuprovider.domain.spec import TaskSpec
from gpuprovider.domain.states import TaskState


class SpecCache:
    """Decoded specs by task id, shared by every reader of tasks in the process: a spec
    never changes once submitted, and validating it again costs more than the read."""

    def __init__(self, size: int = 8192):
        self.size = size
        self._specs: dict[str, TaskSpec] = {}
        self._lock = threading.Lock()

    def get(self, task_id: str, raw: dict[str, Any]) -> TaskSpec:
        spec = self._specs.get(task_id)
        if spec is None:
            spec = TaskSpec.model_validate(raw)
            self.put(task_id, spec)
        return spec

    def put(self, task_id: str, spec: TaskSpec) -> None:
        with self._lock:
            if len(self._specs) >= self.size:  # forget the oldest half
                for stale in list(self._specs)[: self.size // 2]:
                    del self._specs[stale]
            self._specs[task_id] = spec


SPECS = SpecCache()


class OwnerKind(StrEnum):
    """What may own tasks (and services): its rule hears their transitions."""

    SERVICE = "service"  # a replica of a service
    LEASE = "lease"  # the work of a market lease
    PIPELINE = "pipeline"  # a pipeline's stage (or a batch of stages), or its clean-up
    RENTAL = "rental"  # the environment of a rental


@dataclass
class TaskRecord:
    id: str
    name: str | None
    tenant: str
    kind: str
    state: TaskState
    state_reason: str
    spec: dict[str, Any]
    priority: int
    attempt: int
    preemptions: int
    gang: str | None
    not_before: float
    queue_deadline: float | None
    exit_code: int | None
    node_id: str | None
    pid: int | None
    pid_start_time: float | None
    run_dir: str | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    version: int
    crash_streak: int = 0  # a service's quick failures in a row
    owner_kind: str | None = None  # OwnerKind: what the task belongs to, if anything
    owner_id: str | None = None

    @property
    def service_id(self) -> str | None:
        """The service this task is a replica of."""
        return self.owner_id if self.owner_kind == OwnerKind.SERVICE else None

    @cached_property
    def task_spec(self) -> TaskSpec:
        """The spec as a model (validated once per task in the process)."""
        return SPECS.get(self.id, self.spec)

    @property
    def label(self) -> str:
        return self.name or self.id


@dataclass
class AllocationRecord:
    id: int
    task_id: str
    attempt: int
    node_id: str
    gpu_uuids: list[str]
    gpu_milli: int
    cpu_milli: int
    memory_mib: int
    ports: dict[str, int]
    over_quota: bool
    active: bool
    created_at: float
    released_at: float | None


@dataclass(frozen=True)
class JournalRow:
    """One transition of an aggregate (or, with from == to, a note of a change that left
    its state as it was), as the journal keeps it; `id` is its cursor."""

    id: int
    kind: str
    subject: str
    tenant: str
    at: float
    from_state: str | None
    to_state: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "cursor": str(self.id),
            "kind": self.kind,
            "id": self.subject,
            "tenant": self.tenant,
            "at": self.at,
            "from": self.from_state,
            "to": self.to_state,
            "reason": self.reason,
        }

    def brief(self) -> dict[str, Any]:
        """As an aggregate's own history shows it."""
        return {"at": self.at, "from": self.from_state, "to": self.to_state, "reason": self.reason}


@dataclass
class GpuRecord:
    uuid: str
    node_id: str
    idx: int
    model: str
    device_name: str
    memory_mib: int
    memory_gb: int
    simulated: bool
    health: str = "ok"
    health_reason: str = ""
    driver_version: str = ""
    cuda_version: str = ""
    present: bool = True
    cordon_reason: str = ""  # non-empty: cordoned (by an operator or a repair rule)
    # the latest proof-of-GPU verdict (table gpu_proofs), None when never proven
    proof_passed: bool | None = None
    proof_at: float | None = None
    proof_reason: str = ""
    proof_verifier_key: str = ""  # "" for a verdict nobody signed (schema < 6)
    proof_model: str = ""
    proof_simulated: bool = False
    proof_covered_bytes: int = 0
    proof_timed: bool = False
    proof_protocol: str = ""  # the proof protocol its verdict was given under


@dataclass
class NodeRecord:
    id: str
    name: str
    address: str
    backend: str
    labels: dict[str, str]
    status: NodeStatus
    status_reason: str
    cpu_count: int
    memory_mib: int
    disk_mib: int
    public_key: str
    facts: dict[str, Any]
    last_heartbeat: float
    gpus: list[GpuRecord] = field(default_factory=list)
    # While unreachable: the status it returns to when it answers again.
    prior_status: NodeStatus | None = None


@dataclass
class TokenRecord:
    """An API token as the provider knows it (the secret is never kept): who calls."""

    id: str
    name: str
    scopes: list[str]
    tenant: str
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    def allows(self, scope: str) -> bool:
        return self.is_admin or scope in self.scopes

    def sees(self, tenant: str) -> bool:
        """Whether this caller may see a tenant's tasks."""
        return self.is_admin or tenant == self.tenant

    def valid_at(self, now: float) -> bool:
        """Neither revoked nor expired at `now` (a time.time())."""
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


@dataclass
class ServiceRecord:
    id: str
    name: str
    tenant: str
    spec: dict[str, Any]
    replicas: int  # wanted now (the autoscaler moves it)
    next_replica: int  # numbers replica names
    state: ServiceState
    created_at: float
    updated_at: float
    owner_kind: str | None = None  # OwnerKind: a lease's service
    owner_id: str | None = None
    # replicas (task ids) being drained, since when: the router sends them nothing new,
    # and they are stopped once it reports nothing in flight on them
    draining: dict[str, float] = field(default_factory=dict)

    @cached_property
    def task_spec(self) -> TaskSpec:
        return TaskSpec.model_validate(self.spec)
