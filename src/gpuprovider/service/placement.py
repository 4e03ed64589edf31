"""Between the store and the scheduler library: snapshots in, allocations out."""

from __future__ import annotations

import time
from collections.abc import Iterable

from gpuprovider.domain.records import AllocationRecord, NodeRecord, OwnerKind, TaskRecord
from gpuprovider.domain.spec import TaskSpec
from gpuprovider.domain.usability import Usability
from gpuprovider.pipelines.spec import NODE_LABEL, POOL_LABEL, POOL_PER_NODE_LABEL
from gpuprovider.scheduler import GpuView, NodeView, Snapshot, TaskRequest


def build_snapshot(
    nodes: Iterable[NodeRecord],
    allocations: Iterable[AllocationRecord],
    usability: Usability,
    idle: bool = False,
    holders: dict[str, TaskRecord] | None = None,
) -> Snapshot:
    """The cluster as the scheduler sees it; `idle` ignores current allocations.
    `holders` (the allocations' tasks) count pipeline stages per pool on each node."""
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
                holder = holders.get(alloc.task_id) if holders else None
                if holder is not None and (pool := pool_of(holder)) is not None:
                    view.pools[pool[0]] = view.pools.get(pool[0], 0) + 1
    return Snapshot(list(views.values()))


def pool_of(task: TaskRecord) -> tuple[str, int] | None:
    """A pipeline stage's pool with a per-node limit, as the scheduler holds it: the
    tenant's pool (pools are per tenant) and the limit. Only tasks a pipeline owns have
    one: the labels of a tenant's own task mean nothing to the scheduler."""
    if task.owner_kind != OwnerKind.PIPELINE:
        return None
    labels = task.task_spec.labels
    limit = labels.get(POOL_PER_NODE_LABEL, "")
    pool = labels.get(POOL_LABEL)
    if not pool or not limit.isdigit():
        return None
    return f"{task.tenant}/{pool}", int(limit)


def pinned_to(task: TaskRecord) -> str | None:
    """The node a pipeline's stage must run on (its work store's), if any."""
    if task.owner_kind != OwnerKind.PIPELINE:
        return None
    return task.task_spec.labels.get(NODE_LABEL)


def task_request(
    task_id: str,
    spec: TaskSpec,
    priority: int | None = None,
    gang: str | None = None,
    pool: tuple[str, int] | None = None,
    node_id: str | None = None,
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
        pool=pool,
        node_id=node_id,
    )


def larger_than_every_node(spec: TaskSpec, nodes: Iterable[NodeRecord]) -> str:
    """Why no known node could ever hold `spec` however idle, healthy or labelled it
    were (sizes only: CPU, memory, GPU count), or "" when one could, or none is known
    yet (a Ray cluster's nodes may still be joining)."""
    sizes = [(n.cpu_count, n.memory_mib, sum(g.present for g in n.gpus), n.name) for n in nodes]
    if not sizes:
        return ""
    cpu, memory, gpus = spec.resources.cpu, spec.resources.memory_mib, spec.gpu.gpus_touched
    if any(cpu <= c and memory <= m and gpus <= g for c, m, g, _ in sizes):
        return ""
    asked = []
    if cpu > max(c for c, _, _, _ in sizes):
        asked.append(f"{cpu:g} CPU")
    if memory > max(m for _, m, _, _ in sizes):
        asked.append(f"{memory} MiB of memory")
    if gpus > max(g for _, _, g, _ in sizes):
        asked.append(f"{gpus} GPU(s)")
    largest = max(sizes, key=lambda s: (s[2], s[0], s[1]))
    what = " and ".join(asked) or f"{cpu:g} CPU, {memory} MiB and {gpus} GPU(s) on one node"
    return (
        f"resources: asks for {what}, more than any node has; the largest is "
        f"{largest[3]} with {largest[0]} CPU, {largest[1]} MiB of memory and "
        f"{largest[2]} GPU(s)"
    )
