"""The node status machine, as one table (the task machine's sibling)."""

from __future__ import annotations

from enum import StrEnum


class NodeStatus(StrEnum):
    READY = "ready"  # takes new work
    CORDONED = "cordoned"  # no new work; what runs there stays (an operator, a repair rule)
    DRAINING = "draining"  # no new work; jobs finish there, services move away
    UNREACHABLE = "unreachable"  # not answering; returns to its earlier status when back
    REMOVED = "removed"  # forgotten by the operator; comes back only by registering again


N = NodeStatus

NODE_TRANSITIONS: dict[NodeStatus, frozenset[NodeStatus]] = {
    N.READY: frozenset({N.CORDONED, N.DRAINING, N.UNREACHABLE, N.REMOVED}),
    N.CORDONED: frozenset({N.READY, N.DRAINING, N.UNREACHABLE, N.REMOVED}),
    N.DRAINING: frozenset({N.READY, N.CORDONED, N.UNREACHABLE, N.REMOVED}),
    # back to what it was before it went unreachable (a drained node stays draining)
    N.UNREACHABLE: frozenset({N.READY, N.CORDONED, N.DRAINING, N.REMOVED}),
    N.REMOVED: frozenset({N.READY}),
}
