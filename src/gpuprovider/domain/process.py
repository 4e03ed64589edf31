"""How a task's process ended, as a backend reports it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Exit:
    exit_code: int | None
    reason: str
    stopped: bool = False
    timed_out: bool = False
    lost: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and not (self.stopped or self.timed_out or self.lost)


FAILURE_KINDS = (
    ("killed: out of memory", "oom"),
    ("exceeded its max duration", "max_duration"),
    ("killed by signal", "signal"),
    ("exited with code", "exit_code"),
    ("lost:", "lost"),
    ("never started", "start_failed"),
    ("could not start", "start_failed"),
)


def failure_kind(reason: str) -> str:
    """A failed task's reason as one of a few kinds (a bounded metrics label)."""
    for prefix, kind in FAILURE_KINDS:
        if reason.startswith(prefix):
            return kind
    return "other"
