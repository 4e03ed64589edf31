"""What every backend does: start, poll, stop and re-adopt task processes.

Placement is not here: a backend runs a task where the scheduler put it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Launch:
    task_id: str
    attempt: int
    argv: list[str]
    env: dict[str, str]
    workdir: str
    run_dir: str
    max_duration_s: float | None = None
    grace_s: float = 10.0
    node_id: str = ""  # the node the scheduler chose; the local backend has only one


@dataclass
class Handle:
    """Enough to find a task's process again after a daemon restart."""

    pid: int
    start_time: float
    run_dir: str
    attempt: int
    node_id: str = ""


@dataclass
class Exit:
    exit_code: int | None
    reason: str
    stopped: bool = False
    timed_out: bool = False
    lost: bool = False
    details: dict = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and not (self.stopped or self.timed_out or self.lost)


class NodeDown(OSError):
    """The task's node is gone: nothing more can run or be learnt there."""

    def __init__(self, node_id: str, why: str):
        super().__init__(why)
        self.node_id = node_id


def node_lost(node_id: str) -> Exit:
    return Exit(None, f"lost: node {node_id} died", lost=True, details={"node_down": node_id})


class Backend(Protocol):
    name: str

    def start(self, launch: Launch) -> Handle: ...

    def poll(self, handle: Handle) -> Exit | None:
        """How the task ended, or None while it runs."""
        ...

    def poll_many(self, handles: list[Handle]) -> list[Exit | None]:
        """`poll` for each handle, in order; a remote backend asks every node at once."""
        ...

    def stop(self, handle: Handle) -> bool:
        """Ask the task to stop: SIGTERM, then SIGKILL after its grace period.

        False when the task cannot take the request yet; the caller asks again.
        """
        ...

    def recover(self, run_dir: str, attempt: int, node_id: str = "") -> Handle | None:
        """Find a runner started for this attempt but never recorded (daemon crash)."""
        ...

    def read_log(self, node_id: str, run_dir: str, offset: int, limit: int) -> bytes:
        """Up to `limit` bytes of a task's output from `offset`, wherever it runs."""
        ...

    def kill(self, handle: Handle) -> None:
        """Stop at once, runner included (used when a stop is not honoured)."""
        ...
