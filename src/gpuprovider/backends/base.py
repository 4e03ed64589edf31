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


@dataclass
class Handle:
    """Enough to find a task's process again after a daemon restart."""

    pid: int
    start_time: float
    run_dir: str
    attempt: int


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


class Backend(Protocol):
    name: str

    def start(self, launch: Launch) -> Handle: ...

    def poll(self, handle: Handle) -> Exit | None:
        """How the task ended, or None while it runs."""
        ...

    def stop(self, handle: Handle) -> bool:
        """Ask the task to stop: SIGTERM, then SIGKILL after its grace period.

        False when the task cannot take the request yet; the caller asks again.
        """
        ...

    def recover(self, run_dir: str, attempt: int) -> Handle | None:
        """Find a runner started for this attempt but never recorded (daemon crash)."""
        ...

    def kill(self, handle: Handle) -> None:
        """Stop at once, runner included (used when a stop is not honoured)."""
        ...
