"""Between the store and the scheduler library: snapshots in, allocations out."""

from __future__ import annotations

import time
from collections.abc import Iterable

from gpuprovider.domain.records import AllocationRecord, NodeRecord
from gpuprovider.domain.spec import TaskSpec
from gpuprovider.domain.usability import Usability
from gpuprovider.scheduler import GpuView, NodeView, Snapshot, TaskRequest


def build_snapshot(
    nodes: Iterable[NodeRecord],
    allocations: Iterable[AllocationRecord],
    usability: Usability,
    idle: bool = False,
) -> Snapshot:
    """The cluster as the scheduler sees it; `idle` ignores current allocations."""
    now = time.time()
    views: dict[str, NodeView] = {}
    for node in nodes:
        views[node.id] = NodeView(
            id=node.id,
            name=node.name,
            cpu_milli=node.cpu_count * 1000,
            memory_mib=node.memory_mib,
            labels=dict(node.labels),
            unusable_reason=usability.node_reason(node),
            gpus=[
                GpuView(
                    uuid=g.uuid,
                    index=g.idx,
                    model=g.model,
                    memory_gb=g.memory_gb,
                    unusable_reason=usability.gpu_reason(g, now),
                )
                for g in node.gpus
            ],
        )
    if not idle:
        for alloc in allocations:
            if view := views.get(alloc.node_id):
                view.take(alloc.gpu_uuids, alloc.gpu_milli, alloc.cpu_milli, alloc.memory_mib)
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
