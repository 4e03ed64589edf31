"""What each node status change causes, and the node changes actors report: the node
machine of the lifecycle kernel (`lifecycle/kernel.py`).

`node_transition` is the one way a node changes status: checked against the table in
`domain/nodes.py`, written with its journal row, its rules applied in the same
transaction. Every change may change what the scheduler can use, so each signals it.
"""

from __future__ import annotations

from typing import Any

from gpuprovider.domain.nodes import NODE_TRANSITIONS, NodeStatus
from gpuprovider.domain.records import NodeRecord
from gpuprovider.domain.states import TERMINAL, TaskState
from gpuprovider.lifecycle.kernel import Change, Machine, Refused, Rule
from gpuprovider.lifecycle.tasks import transition
from gpuprovider.store.signals import Signal
from gpuprovider.store.store import Tx

__all__ = ["NODES", "Refused", "node_lost", "node_seen", "node_transition", "operator_sets"]

N = NodeStatus
NodeChange = Change[NodeStatus]
NodeRule = Rule[Tx, NodeRecord, NodeStatus]


def node_transition(tx: Tx, node: NodeRecord, target: NodeStatus, reason: str) -> None:
    NODES.transition(tx, node, target, reason)


def _write(
    tx: Tx, node: NodeRecord, target: NodeStatus, reason: str, changes: dict[str, Any]
) -> None:
    prior = node.status if target == N.UNREACHABLE else None
    tx.nodes.write_status(node, target, reason, prior)


def _signal_nodes(tx: Tx, node: NodeRecord, change: NodeChange) -> None:
    tx.signal(Signal.NODES)


LIVE_ON_NODE = [
    s for s in TaskState if s not in TERMINAL and s not in (TaskState.SUBMITTED, TaskState.QUEUED)
]


def _move_services(tx: Tx, node: NodeRecord, change: NodeChange) -> None:
    for task in tx.tasks.find(states=[TaskState.RUNNING], node_id=node.id, kind="service"):
        transition(tx, task, TaskState.PREEMPTED, f"moving: node {node.name} is draining")


def _idle(tx: Tx, node: NodeRecord, change: NodeChange) -> None:
    live = tx.tasks.find(states=LIVE_ON_NODE, node_id=node.id)
    if live:
        names = ", ".join(t.label for t in live)
        raise Refused(f"node {node.name} still runs {names}; wait for them or cancel them")


NODE_RULES: list[NodeRule] = [
    NodeRule(
        "wake-scheduler",
        "every status change may change what the scheduler can use",
        frozenset(N),
        then=_signal_nodes,
    ),
    NodeRule(
        "drain-moves-services",
        "a draining node's running services move (re-queued like preempted work); "
        "its jobs finish there",
        frozenset({N.DRAINING}),
        then=_move_services,
    ),
    NodeRule(
        "remove-when-idle",
        "a node is removed only once nothing runs there",
        frozenset({N.REMOVED}),
        guard=_idle,
    ),
]
NODES: Machine[Tx, NodeRecord, NodeStatus] = Machine(
    "node",
    NODE_TRANSITIONS,
    write=_write,
    state_of=lambda node: node.status,
    subject_of=lambda node: node.id,
    rules=NODE_RULES,
)


# -- what actors report -----------------------------------------------------------------


def node_seen(tx: Tx, node: NodeRecord) -> bool:
    """The backend reports `node` alive with this hardware. A new node registers as
    ready; one that was unreachable returns to the status it had (a drained node stays
    draining); a removed one registers again. True when its status changed."""
    known = tx.nodes.get(node.id, removed=True)
    if known is None:
        node.status, node.status_reason, node.prior_status = N.READY, "", None
        tx.nodes.write_inventory(node)
        tx.nodes.registered(node, "registered")
        tx.signal(Signal.NODES)
        return True
    tx.nodes.write_inventory(node)
    tx.signal(Signal.NODES)  # its hardware may have changed
    if known.status == N.UNREACHABLE:
        back = known.prior_status or N.READY
        why = "answers again" + ("" if back == N.READY else f"; {back} as before it went")
        node_transition(tx, known, back, why)
        return True
    if known.status == N.REMOVED:
        node_transition(tx, known, N.READY, "registered again after its removal")
        return True
    return False


def node_lost(tx: Tx, node_id: str, why: str) -> bool:
    """The backend reports the node dead or not answering. True when that is news."""
    node = tx.nodes.get(node_id)
    if node is None or node.status == N.UNREACHABLE:
        return False
    node_transition(tx, node, N.UNREACHABLE, why)
    return True


def operator_sets(tx: Tx, node: NodeRecord, target: NodeStatus, by: str, why: str = "") -> None:
    """An operator cordons, drains, resumes or removes a node."""
    if node.status == target:
        return
    if node.status == N.UNREACHABLE and target != N.REMOVED:
        raise Refused(
            f"node {node.name} is unreachable; it cannot be made {target} until it answers "
            f"(it returns as {node.prior_status or N.READY}), or remove it"
        )
    if node.status == N.REMOVED:
        raise Refused(f"node {node.name} was removed; it comes back by registering again")
    verb = {
        N.READY: "resumed",
        N.CORDONED: "cordoned",
        N.DRAINING: "drained",
        N.REMOVED: "removed",
    }[target]
    node_transition(tx, node, target, f"{verb} by {by}" + (f": {why}" if why else ""))


def gpu_cordon(tx: Tx, uuid: str, reason: str) -> None:
    """Cordon a GPU (no new work; what runs there stays), or lift it (`reason` empty)."""
    tx.nodes.set_gpu_cordon(uuid, reason)
    tx.signal(Signal.NODES)
