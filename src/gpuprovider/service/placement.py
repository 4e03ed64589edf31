"""Between the store and the scheduler library: snapshots in, allocations out."""

from __future__ import annotations

import socket
from collections.abc import Iterable

from gpuprovider.domain.spec import TaskSpec
from gpuprovider.scheduler import GpuView, NodeView, Snapshot, TaskRequest
from gpuprovider.service.views import gpu_unusable_reason
from gpuprovider.store.records import AllocationRecord, NodeRecord

NODE_STATUS_REASONS = {
    "cordoned": "node is cordoned",
    "draining": "node is draining",
    "unreachable": "node is unreachable",
}


def build_snapshot(
    nodes: Iterable[NodeRecord],
    allocations: Iterable[AllocationRecord],
    idle: bool = False,
    proof_max_age_s: float | None = None,
) -> Snapshot:
    """The cluster as the scheduler sees it; `idle` ignores current allocations;
    `proof_max_age_s` keeps work off GPUs without a recent passing proof of GPU."""
    views: dict[str, NodeView] = {}
    for node in nodes:
        views[node.id] = NodeView(
            id=node.id,
            name=node.name,
            cpu_milli=node.cpu_count * 1000,
            memory_mib=node.memory_mib,
            labels=dict(node.labels),
            unusable_reason=(
                ""
                if node.status == "ready"
                else node.status_reason or NODE_STATUS_REASONS.get(node.status, node.status)
            ),
            gpus=[
                GpuView(
                    uuid=g.uuid,
                    index=g.idx,
                    model=g.model,
                    memory_gb=g.memory_gb,
                    unusable_reason=gpu_unusable_reason(g, proof_max_age_s),
                )
                for g in node.gpus
            ],
        )
    if not idle:
        for alloc in allocations:
            view = views.get(alloc.node_id)
            if view is None:
                continue
            view.used_cpu_milli += alloc.cpu_milli
            view.used_memory_mib += alloc.memory_mib
            taken = set(alloc.gpu_uuids)
            for gpu in view.gpus:
                if gpu.uuid in taken:
                    gpu.used_milli += alloc.gpu_milli
    return Snapshot(list(views.values()))


def task_request(
    task_id: str, spec: TaskSpec, priority: int | None = None, gang: str | None = None
) -> TaskRequest:
    """What the scheduler needs of a task; `priority` overrides the spec's (quotas)."""
    return TaskRequest(
        task_id=task_id,
        gpu=spec.gpu,
        cpu_milli=round(spec.resources.cpu * 1000),
        memory_mib=spec.resources.memory_mib,
        priority=spec.priority if priority is None else priority,
        node_selector=tuple(sorted(spec.node_selector.items())),
        gang=gang,
        gang_size=spec.gang.size if spec.gang else 0,
    )


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def choose_ports(
    names: list[str], taken: set[int], port_range: tuple[int, int]
) -> dict[str, int] | None:
    """Free host ports for a service's named ports, or None if the range is exhausted."""
    chosen: dict[str, int] = {}
    lo, hi = port_range
    candidate = lo
    for name in names:
        while candidate <= hi and (candidate in taken or not port_free(candidate)):
            candidate += 1
        if candidate > hi:
            return None
        chosen[name] = candidate
        candidate += 1
    return chosen
