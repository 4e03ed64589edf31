"""What the scheduler sees and what it decides. Plain data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

from gpuprovider.domain.resources import GpuRequest


@dataclass
class GpuView:
    uuid: str
    index: int
    model: str
    memory_gb: int
    used_milli: int = 0
    unusable_reason: str = ""  # non-empty: unhealthy, failed a check, not present


@dataclass
class NodeView:
    id: str
    name: str
    cpu_milli: int
    memory_mib: int
    gpus: list[GpuView] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    unusable_reason: str = ""  # non-empty: cordoned, draining, unreachable
    used_cpu_milli: int = 0
    used_memory_mib: int = 0
    # work of each pool (a pipeline stage's) holding resources here: pool -> how many
    pools: dict[str, int] = field(default_factory=dict)

    def take(
        self,
        gpu_uuids: tuple[str, ...] | list[str],
        gpu_milli: int,
        cpu_milli: int,
        memory_mib: int,
    ) -> None:
        """Count work holding these resources on this node (the one place that does)."""
        self.used_cpu_milli += cpu_milli
        self.used_memory_mib += memory_mib
        chosen = set(gpu_uuids)
        for gpu in self.gpus:
            if gpu.uuid in chosen:
                gpu.used_milli += gpu_milli


@dataclass(frozen=True)
class RunningTask:
    """Work holding resources now, as preemption sees it."""

    task_id: str
    node_id: str
    gpu_uuids: tuple[str, ...]
    gpu_milli: int
    cpu_milli: int
    memory_mib: int
    priority: int
    preemptible: bool
    started_at: float  # the latest started loses the least when evicted
    gang: str | None = None  # a gang's members are evicted together


@dataclass
class Snapshot:
    nodes: list[NodeView]
    running: list[RunningTask] = field(default_factory=list)

    def node(self, node_id: str) -> NodeView:
        return next(n for n in self.nodes if n.id == node_id)


@dataclass(frozen=True)
class TaskRequest:
    task_id: str
    gpu: GpuRequest
    cpu_milli: int = 0
    memory_mib: int = 0
    priority: int = 0
    node_selector: tuple[tuple[str, str], ...] = ()
    # Members of one gang are placed all together or not at all.
    gang: str | None = None
    gang_size: int = 0
    # A pool with a per-node limit (a pipeline stage's): (pool, at most this many on a node).
    pool: tuple[str, int] | None = None
    # Only this node may take it (a pipeline stage whose work store is a folder there).
    node_id: str | None = None


@dataclass(frozen=True)
class Placement:
    task_id: str
    node_id: str
    gpu_uuids: tuple[str, ...]
    gpu_milli: int  # per GPU: 1000 for whole GPUs, the share for a fraction
    cpu_milli: int
    memory_mib: int


@dataclass(frozen=True)
class Unplaced:
    task_id: str
    reason: str


@dataclass(frozen=True)
class Preemption:
    """The task fits on `node_id` once `victims` have stopped; until then it waits."""

    task_id: str
    node_id: str
    victims: tuple[str, ...]
    reason: str


Decision = Placement | Unplaced | Preemption
