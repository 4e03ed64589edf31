"""The placement pipeline: filter -> score -> select -> reserve, each a named
extension point that policies plug into.

A filter says why a node cannot take a task (or None if it can); a scorer ranks
the nodes left; a GPU picker chooses devices on the chosen node; reserve
records the placement in the snapshot so the next task sees it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gpuprovider.scheduler.model import (
    Decision,
    GpuView,
    NodeView,
    Placement,
    Snapshot,
    TaskRequest,
    Unplaced,
)

Filter = Callable[[NodeView, TaskRequest], str | None]
Scorer = Callable[[NodeView, TaskRequest], float]
GpuPicker = Callable[[NodeView, TaskRequest], list[GpuView]]


def fitting_gpus(node: NodeView, task: TaskRequest) -> list[GpuView]:
    """GPUs on `node` of a model the task accepts with room for its share."""
    need = task.gpu.milli_per_gpu
    return [g for g in node.gpus if g.free_milli >= need and task.gpu.matches(g.model, g.memory_gb)]


@dataclass
class Policy:
    name: str
    filters: Sequence[Filter]
    scorer: Scorer
    pick_gpus: GpuPicker


class Framework:
    def __init__(self, policy: Policy):
        self.policy = policy

    def place(self, snapshot: Snapshot, tasks: Sequence[TaskRequest]) -> list[Decision]:
        """Place tasks in the order given (the caller orders them by priority)."""
        return [self.place_one(snapshot, task) for task in tasks]

    def place_one(self, snapshot: Snapshot, task: TaskRequest) -> Decision:
        feasible: list[NodeView] = []
        rejections: list[str] = []
        for node in snapshot.nodes:
            reason = self._filter(node, task)
            if reason is None:
                feasible.append(node)
            else:
                rejections.append(reason)
        if not feasible:
            return Unplaced(task.task_id, explain(snapshot, task, rejections))
        # max() keeps the first of equal scores, so ties go to the earlier node.
        chosen = max(feasible, key=lambda n: self.policy.scorer(n, task))
        placement = Placement(
            task_id=task.task_id,
            node_id=chosen.id,
            gpu_uuids=tuple(g.uuid for g in self.policy.pick_gpus(chosen, task)),
            gpu_milli=task.gpu.milli_per_gpu if task.gpu.wants_gpu else 0,
            cpu_milli=task.cpu_milli,
            memory_mib=task.memory_mib,
        )
        reserve(snapshot, placement)
        return placement

    def _filter(self, node: NodeView, task: TaskRequest) -> str | None:
        for check in self.policy.filters:
            reason = check(node, task)
            if reason is not None:
                return reason
        return None


def reserve(snapshot: Snapshot, placement: Placement) -> None:
    node = snapshot.node(placement.node_id)
    node.used_cpu_milli += placement.cpu_milli
    node.used_memory_mib += placement.memory_mib
    chosen = set(placement.gpu_uuids)
    for gpu in node.gpus:
        if gpu.uuid in chosen:
            gpu.used_milli += placement.gpu_milli


GPU_SHORT = "not enough free GPUs of the kind asked"


def explain(snapshot: Snapshot, task: TaskRequest, rejections: list[str]) -> str:
    """One line a user can act on: `no node has 2 free H100 (at most 1 on one node)`."""
    if not snapshot.nodes:
        return "no node is registered yet"
    counts = Counter(rejections)
    if set(counts) == {GPU_SHORT}:
        most = max(len(fitting_gpus(n, task)) for n in snapshot.nodes)
        return f"no node has {task.gpu.describe()} free (at most {most} on one node)"
    if len(snapshot.nodes) == 1:
        return f"{snapshot.nodes[0].name}: {rejections[0]}"
    detail = "; ".join(f"{n} node{'s' if n > 1 else ''}: {why}" for why, n in counts.most_common(3))
    return f"no node fits ({detail})"
