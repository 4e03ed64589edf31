"""How a task's process ended, as a backend reports it."""

from __future__ import annotations

from dataclasses import dataclass, field


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
