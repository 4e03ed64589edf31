"""Nodes, their GPUs and their status history."""

from __future__ import annotations

import builtins
from dataclasses import fields
from typing import TYPE_CHECKING

from sqlalchemy import insert, or_, select, update

from gpuprovider.domain.nodes import NodeStatus
from gpuprovider.domain.records import GpuRecord, JournalRow, NodeRecord
from gpuprovider.lifecycle.kernel import Stale
from gpuprovider.store import schema as t
from gpuprovider.store.rows import record

if TYPE_CHECKING:
    from gpuprovider.store.store import Tx

# Inventory refreshes facts; these are the provider's own and it keeps them.
_KEPT_NODE = frozenset({"status", "status_reason", "prior_status"})
_KEPT_GPU = frozenset({"health", "health_reason", "cordon_reason"})
_NODE_COLUMNS = [f.name for f in fields(NodeRecord) if f.name != "gpus"]
_GPU_COLUMNS = [f.name for f in fields(GpuRecord) if not f.name.startswith("proof_")]
_PROOF_COLUMNS = [f.name[len("proof_") :] for f in fields(GpuRecord) if f.name.startswith("proof_")]


def _node(row: object) -> NodeRecord:
    node = record(NodeRecord, row)
    node.status = NodeStatus(node.status)
    node.prior_status = NodeStatus(node.prior_status) if node.prior_status else None
    return node


class NodeRepo:
    def __init__(self, tx: Tx):
        self.tx = tx

    def list(self, ids: list[str] | None = None, removed: bool = False) -> list[NodeRecord]:
        """Nodes with their GPUs and latest proofs: every node, or only `ids`; removed
        nodes only when asked."""
        node_q = select(t.nodes).order_by(t.nodes.c.name)
        gpu_q = select(t.gpus).order_by(t.gpus.c.node_id, t.gpus.c.idx)
        proof_q = select(t.gpu_proofs)
        if ids is not None:
            node_q = node_q.where(t.nodes.c.id.in_(ids))
            gpu_q = gpu_q.where(t.gpus.c.node_id.in_(ids))
            proof_q = proof_q.where(t.gpu_proofs.c.node_id.in_(ids))
        if not removed:
            node_q = node_q.where(t.nodes.c.status != NodeStatus.REMOVED.value)
        conn = self.tx.conn
        node_rows = conn.execute(node_q).all()
        gpu_rows = conn.execute(gpu_q).all()
        proofs = {row.gpu_uuid: row for row in conn.execute(proof_q)}
        by_node: dict[str, list[GpuRecord]] = {}
        for row in gpu_rows:
            gpu = record(GpuRecord, row)
            if proof := proofs.get(gpu.uuid):
                for name in _PROOF_COLUMNS:
                    setattr(gpu, "proof_" + name, getattr(proof, name))
            by_node.setdefault(row.node_id, []).append(gpu)
        nodes = []
        for row in node_rows:
            node = _node(row)
            node.gpus = by_node.get(node.id, [])
            nodes.append(node)
        return nodes

    def get(self, ref: str, removed: bool = False) -> NodeRecord | None:
        """A node by id, else by name (a live node before a removed one of that name)."""
        rows = self.tx.conn.execute(
            select(t.nodes.c.id, t.nodes.c.status)
            .where(or_(t.nodes.c.id == ref, t.nodes.c.name == ref))
            .order_by((t.nodes.c.id == ref).desc(), t.nodes.c.status == NodeStatus.REMOVED.value)
        ).all()
        for row in rows:
            if removed or row.status != NodeStatus.REMOVED.value:
                return self.list([row.id], removed=True)[0]
        return None

    def status_of(self) -> dict[str, NodeStatus]:
        rows = self.tx.conn.execute(select(t.nodes.c.id, t.nodes.c.status))
        return {row.id: NodeStatus(row.status) for row in rows}

    def write_inventory(self, node: NodeRecord) -> None:
        """Record a node's latest hardware and heartbeat. A new node is inserted with the
        status it carries; a known node keeps its status, GPU health and cordons. GPUs
        gone from the report stay listed, as not present."""
        conn = self.tx.conn
        values = {name: getattr(node, name) for name in _NODE_COLUMNS}
        exists = conn.execute(select(t.nodes.c.id).where(t.nodes.c.id == node.id)).first()
        if exists:
            for name in _KEPT_NODE:
                values.pop(name)
            conn.execute(update(t.nodes).where(t.nodes.c.id == node.id).values(**values))
        else:
            conn.execute(insert(t.nodes).values(**values))
        known = {
            row.uuid
            for row in conn.execute(select(t.gpus.c.uuid).where(t.gpus.c.node_id == node.id))
        }
        for gpu in node.gpus:
            gpu_values = {name: getattr(gpu, name) for name in _GPU_COLUMNS}
            if gpu.uuid in known:
                for name in _KEPT_GPU:
                    gpu_values.pop(name)
                conn.execute(update(t.gpus).where(t.gpus.c.uuid == gpu.uuid).values(**gpu_values))
            else:
                conn.execute(insert(t.gpus).values(**gpu_values))
                self.tx.checks.apply_health(gpu.uuid)  # checked before it was registered
        for uuid in known - {g.uuid for g in node.gpus}:
            conn.execute(update(t.gpus).where(t.gpus.c.uuid == uuid).values(present=False))

    def write_status(
        self,
        node: NodeRecord,
        target: NodeStatus,
        reason: str,
        prior_status: NodeStatus | None = None,
    ) -> None:
        """Store a status change and its journal row, guarded by the status read. Only
        the lifecycle calls this: it checks the change against the node status table
        first. A ready node shows no reason; its journal row keeps one."""
        shown = "" if target == NodeStatus.READY else reason
        done = self.tx.conn.execute(
            update(t.nodes)
            .where(t.nodes.c.id == node.id, t.nodes.c.status == node.status.value)
            .values(
                status=target.value,
                status_reason=shown,
                prior_status=prior_status.value if prior_status else None,
            )
        )
        if done.rowcount != 1:
            raise Stale("node", node.id)
        self.tx.journal.write("node", node.id, "", node.status.value, target.value, reason)
        node.status, node.status_reason, node.prior_status = target, shown, prior_status

    def registered(self, node: NodeRecord, reason: str) -> None:
        """The journal row of a node that registers for the first time."""
        self.tx.journal.write("node", node.id, "", None, node.status.value, reason)

    def events(self, node_id: str) -> builtins.list[JournalRow]:
        return self.tx.journal.of("node", node_id)

    def gpu(self, uuid: str) -> GpuRecord | None:
        row = self.tx.conn.execute(select(t.gpus).where(t.gpus.c.uuid == uuid)).first()
        return record(GpuRecord, row) if row else None

    def set_gpu_cordon(self, uuid: str, reason: str) -> None:
        """Cordon a GPU (`reason` non-empty) or lift its cordon (empty)."""
        self.tx.conn.execute(
            update(t.gpus).where(t.gpus.c.uuid == uuid).values(cordon_reason=reason)
        )
