"""Nodes and GPUs behind the API: list, drain, cordon, resume, remove, checks."""

from __future__ import annotations

import builtins
from typing import Any

from gpuprovider.check.result import Result, Status
from gpuprovider.domain.nodes import NodeStatus
from gpuprovider.domain.records import NodeRecord, TokenRecord
from gpuprovider.domain.states import ALLOCATED, TaskState
from gpuprovider.domain.usability import Usability
from gpuprovider.lifecycle import nodes as lifecycle
from gpuprovider.lifecycle.nodes import Refused
from gpuprovider.service.errors import Conflict, NotFound, Rejected
from gpuprovider.service.repair import REPAIR_CORDON
from gpuprovider.service.views import gpu_views, node_view
from gpuprovider.store.signals import Signal
from gpuprovider.store.store import Store, Tx

N = NodeStatus


class NodeService:
    def __init__(self, store: Store, usability: Usability):
        self.store = store
        self.usability = usability

    @staticmethod
    def _find(tx: Tx, ref: str) -> NodeRecord:
        node = tx.nodes.get(ref)
        if node is None:
            names = ", ".join(n.name for n in tx.nodes.list()) or "none yet"
            raise NotFound(f"no node {ref!r}; nodes: {names}")
        return node

    def list(self, removed: bool = False) -> list[dict[str, Any]]:
        with self.store.read() as r:
            return [node_view(n, self.usability) for n in r.nodes.list(removed=removed)]

    def get(self, ref: str) -> dict[str, Any]:
        with self.store.read() as r:
            node = self._find(r, ref)
            return node_view(node, self.usability, r.nodes.events(node.id))

    def _set(self, ref: str, target: NodeStatus, who: TokenRecord, why: str = "") -> NodeRecord:
        try:
            with self.store.tx() as tx:
                node = self._find(tx, ref)
                lifecycle.operator_sets(tx, node, target, who.name, why)
        except Refused as exc:
            raise Conflict(str(exc)) from None
        return node

    def drain(self, ref: str, who: TokenRecord) -> dict[str, Any]:
        """No new work on the node; its running services move to other nodes (they are
        re-queued like preempted work, keeping their attempts); its jobs finish there."""
        node = self._set(ref, N.DRAINING, who)
        with self.store.read() as r:
            live = r.tasks.find(states=lifecycle.LIVE_ON_NODE, node_id=node.id)
        moved = [t.label for t in live if t.state == TaskState.PREEMPTED and t.kind == "service"]
        staying = [t.label for t in live if t.label not in moved]
        return {
            "node": node.name,
            "status": node.status.value,
            "moved": moved,
            "finishing": staying,
        }

    def cordon(self, ref: str, who: TokenRecord, why: str) -> dict[str, Any]:
        node = self._set(ref, N.CORDONED, who, why)
        return {"node": node.name, "status": node.status.value}

    def resume(self, ref: str, who: TokenRecord) -> dict[str, Any]:
        node = self._set(ref, N.READY, who)
        return {"node": node.name, "status": node.status.value}

    def remove(self, ref: str, who: TokenRecord) -> dict[str, Any]:
        with self.store.read() as r:
            node = self._find(r, ref)
        if node.status not in (N.DRAINING, N.UNREACHABLE):
            raise Conflict(f"drain node {node.name} first: `gpuprovider node drain {node.name}`")
        self._set(node.id, N.REMOVED, who)
        return {"node": node.name, "removed": True}

    # -- GPUs ----------------------------------------------------------------------

    def gpus(self, who: TokenRecord) -> builtins.list[dict[str, Any]]:
        """Every GPU and how much of it is used; the tasks on it only where `who` sees
        them (a tenant: its own)."""
        with self.store.read() as r:
            views = gpu_views(r.nodes.list(), r.tasks.active_allocations(), self.usability)
            if who.is_admin:
                return views
            mine = {t.id for t in r.tasks.find(states=sorted(ALLOCATED), tenant=who.tenant)}
        for view in views:
            view["tasks"] = [task_id for task_id in view["tasks"] if task_id in mine]
        return views

    def cordon_gpu(self, uuid: str, who: TokenRecord, why: str) -> dict[str, Any]:
        """No new work on one GPU; what runs there stays."""
        return self._gpu_cordon(uuid, f"by {who.name}" + (f": {why}" if why else ""))

    def uncordon_gpu(self, uuid: str, force: bool = False) -> dict[str, Any]:
        """Lift a person's cordon. A repair rule's is lifted by a passing check of the
        GPU (`gpuprovider check`), or here only with `force`."""
        with self.store.read() as r:
            gpu = r.nodes.gpu(uuid)
            node = r.nodes.get(gpu.node_id) if gpu else None
        if gpu and gpu.cordon_reason.startswith(REPAIR_CORDON) and not force:
            raise Conflict(
                f"GPU {uuid} was cordoned by a {gpu.cordon_reason}; it returns once a check "
                f"passes: run `gpuprovider check` on node {node.name if node else gpu.node_id} "
                "(or uncordon with --force to return it unchecked)"
            )
        return self._gpu_cordon(uuid, "")

    def _gpu_cordon(self, uuid: str, reason: str) -> dict[str, Any]:
        with self.store.tx() as tx:
            if tx.nodes.gpu(uuid) is None:
                raise NotFound(f"no GPU {uuid!r}; `gpuprovider gpu list` shows them")
            lifecycle.gpu_cordon(tx, uuid, reason)
        return {"gpu_uuid": uuid, "cordoned": bool(reason), "reason": reason}

    # -- checks --------------------------------------------------------------------

    def checks(self, ref: str) -> dict[str, Any]:
        with self.store.read() as r:
            node = self._find(r, ref)
            return {"node_id": node.id, "node": node.name, "results": r.checks.latest(node.id)}

    def save_checks(
        self, ref: str, results: builtins.list[Result], ran_at: float
    ) -> dict[str, Any]:
        """Store a `gpuprovider check` run; a GPU whose latest result FAILs gets no new
        work until a passing run clears it."""
        with self.store.tx() as tx:
            node = self._find(tx, ref)
            strangers = sorted(
                {r.gpu_uuid for r in results if r.gpu_uuid} - {g.uuid for g in node.gpus}
            )
            if strangers:
                raise Rejected(f"GPUs {', '.join(strangers)} are not on node {node.name}")
            if tx.checks.save(node.id, results, ran_at):
                tx.signal(Signal.NODES)
            returned = self._return_repaired(tx, node, results)
        return {"node_id": node.id, "saved": len(results), "returned": returned}

    @staticmethod
    def _return_repaired(
        tx: Tx, node: NodeRecord, results: builtins.list[Result]
    ) -> builtins.list[str]:
        """A GPU a repair rule cordoned returns once a check run passes on it: results
        for the GPU, at least one passing and none failing."""
        returned = []
        for gpu in node.gpus:
            if not gpu.cordon_reason.startswith(REPAIR_CORDON):
                continue
            mine = [r for r in results if r.gpu_uuid == gpu.uuid]
            passed = sum(1 for r in mine if r.status == Status.PASS)
            if not passed or any(r.status == Status.FAIL for r in mine):
                continue
            lifecycle.gpu_cordon(tx, gpu.uuid, "")
            tx.repairs.record(
                node.id,
                gpu.uuid,
                gpu.cordon_reason.removeprefix(REPAIR_CORDON).split(":")[0],
                "check",
                "uncordon_gpu",
                "done",
                f"returned to service: {passed} of {len(mine)} checks passed, none failed",
                {"was": gpu.cordon_reason},
            )
            returned.append(gpu.uuid)
        return returned
