"""Operators' actions on nodes: drain (no new work, jobs finish, services move),
resume, remove."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpuprovider.domain.states import TERMINAL, TaskState
from gpuprovider.service.errors import Conflict, NotFound
from gpuprovider.store.records import NodeRecord
from gpuprovider.store.store import StaleTask, Store

S = TaskState


class NodeService:
    def __init__(
        self,
        store: Store,
        on_nodes_changed: Callable[[], None] = lambda: None,
        on_tasks_moved: Callable[[], None] = lambda: None,
    ):
        self.store = store
        self.on_nodes_changed, self.on_tasks_moved = on_nodes_changed, on_tasks_moved

    def get(self, ref: str) -> NodeRecord:
        nodes = self.store.nodes()
        for node in nodes:
            if ref in (node.id, node.name):
                return node
        names = ", ".join(n.name for n in nodes) or "none yet"
        raise NotFound(f"no node {ref!r}; nodes: {names}")

    def live_tasks(self, node_id: str) -> list:
        live = [s for s in S if s not in TERMINAL and s not in (S.SUBMITTED, S.QUEUED)]
        return [t for t in self.store.tasks(states=live) if t.node_id == node_id]

    def drain(self, ref: str, by: str) -> dict[str, Any]:
        """No new work on the node; its running services move to other nodes (they are
        re-queued like preempted work, keeping their attempts); its jobs finish there."""
        node = self.get(ref)
        self.store.set_node_status(node.id, "draining", f"drained by {by}")
        moved, staying = [], []
        for task in self.live_tasks(node.id):
            if task.kind == "service" and task.state == S.RUNNING:
                try:
                    with self.store.tx() as tx:
                        tx.transition(task, S.PREEMPTED, f"moving: node {node.name} is draining")
                    moved.append(task.label)
                    continue
                except StaleTask:
                    pass
            staying.append(task.label)
        self.on_nodes_changed()
        if moved:
            self.on_tasks_moved()
        return {"node": node.name, "status": "draining", "moved": moved, "finishing": staying}

    def resume(self, ref: str) -> dict[str, Any]:
        node = self.get(ref)
        self.store.set_node_status(node.id, "ready", "")
        self.on_nodes_changed()
        return {"node": node.name, "status": "ready"}

    def remove(self, ref: str) -> dict[str, Any]:
        node = self.get(ref)
        if node.status != "draining" and node.status != "unreachable":
            raise Conflict(f"drain node {node.name} first: `gpuprovider node drain {node.name}`")
        live = self.live_tasks(node.id)
        if live:
            names = ", ".join(t.label for t in live)
            raise Conflict(f"node {node.name} still runs {names}; wait for them or cancel them")
        self.store.remove_node(node.id)
        self.on_nodes_changed()
        return {"node": node.name, "removed": True}
