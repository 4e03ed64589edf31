"""What every backend does: discover its nodes, and start, poll, stop and re-adopt
task processes on them.

Placement is not here: a backend runs a task where the scheduler put it. Building
what to run is not here either: `launch.py` builds it, once, for every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from gpuprovider.backends.launch import Launch
from gpuprovider.domain.process import Exit
from gpuprovider.domain.records import NodeRecord
from gpuprovider.telemetry.node import NodeTelemetry

__all__ = [
    "Backend",
    "BackendUnavailable",
    "Discovery",
    "Exit",
    "Handle",
    "Launch",
    "NoFreePort",
    "NodeDown",
    "NodeNotReady",
]


@dataclass
class Handle:
    """Enough to find a task's process again after a daemon restart."""

    pid: int
    start_time: float
    run_dir: str
    attempt: int
    node_id: str = ""
    ports: dict[str, int] = field(default_factory=dict)  # chosen by the node at start


@dataclass
class Discovery:
    nodes: list[NodeRecord] = field(default_factory=list)  # alive, with their hardware
    lost: dict[str, str] = field(default_factory=dict)  # node id -> why it is gone
    # alive nodes that did not answer in time (busy, a new agent), or, between full
    # discoveries, alive nodes not known to answer: asked again soon rather than at the
    # next full discovery, so that their tasks are not given up meanwhile
    unanswered: int = 0


class BackendUnavailable(RuntimeError):
    """The backend cannot be asked at all now (its cluster is unreachable); the message
    says what to fix. The daemon keeps serving and asks again later."""


class NodeDown(OSError):
    """The task's node is gone: nothing more can run or be learnt there."""

    def __init__(self, node_id: str, why: str):
        super().__init__(why)
        self.node_id = node_id


class NoFreePort(OSError):
    """The node has no free port left in the configured range."""


class NodeNotReady(OSError):
    """The node cannot take work yet (a remote backend has not found it since it
    started): not the task's fault, and nothing is wrong with the node."""


def node_lost(node_id: str) -> Exit:
    return Exit(None, f"lost: node {node_id} died", lost=True, details={"node_down": node_id})


class Backend(Protocol):
    name: str
    # How often nodes' liveness is worth asking between full discoveries; None when a
    # backend's nodes cannot die apart from the daemon (the local machine).
    liveness_interval_s: float | None

    def discover(self, full: bool) -> Discovery:
        """The backend's nodes: with `full`, every alive node with its hardware; without,
        only which nodes are lost (cheap: asks no node)."""
        ...

    def start_many(self, launches: list[Launch]) -> list[Handle | OSError]:
        """Start each attempt where its `node_id` says, all at once. For each, its handle,
        or why not: NodeDown, NodeNotReady or NoFreePort when the node cannot take it
        (not the task's fault), another OSError when the task's own launch cannot work (a
        workdir that cannot be made)."""
        ...

    def poll_many(self, handles: list[Handle]) -> list[Exit | None]:
        """How each task ended, or None while it runs, in order; a remote backend asks
        every node at once."""
        ...

    def stop(self, handle: Handle) -> bool:
        """Ask the task to stop: SIGTERM, then SIGKILL after its grace period.

        False when the task cannot take the request yet; the caller asks again.
        """
        ...

    def kill(self, handle: Handle) -> None:
        """Stop at once, runner included (used when a stop is not honoured)."""
        ...

    def recover(self, run_dir: str, attempt: int, node_id: str = "") -> Handle | None:
        """Find a runner started for this attempt but never recorded (daemon crash)."""
        ...

    def read_log(self, node_id: str, run_dir: str, offset: int, limit: int) -> tuple[int, bytes]:
        """Up to `limit` bytes of a task's output from `offset`, wherever it runs, and
        where they start (after `offset` when the output there was dropped by the cap)."""
        ...

    def list_files(self, node_id: str, run_dir: str, path: str) -> list[dict]:
        """The entries of folder `path` in the task's work folder on its node (never past
        it: NotInWorkdir for '..', a link or nothing there)."""
        ...

    def read_file(
        self, node_id: str, run_dir: str, path: str, offset: int, limit: int
    ) -> tuple[int, bytes]:
        """The size of file `path` in the task's work folder, and up to `limit` of its
        bytes from `offset` (NotInWorkdir as `list_files`)."""
        ...

    def remove_work(self, node_id: str, run_dir: str) -> None:
        """Delete an ended task's work folder on its node (its kept period is over);
        NodeDown when the node cannot be asked."""
        ...

    def telemetry(self, poll_nvml: bool, kernel_log: str) -> list[NodeTelemetry]:
        """What each alive node reports about its GPUs: new XIDs from its kernel log
        (`kernel_log`: "auto", a path, or ""), and with `poll_nvml` an NVML sample of
        every GPU. A node that does not answer is left out (liveness is `discover`'s)."""
        ...

    def close(self) -> None: ...
