"""The daemon's loops share one shape: a pass when woken or on a timer. Each reads in
a short transaction, does slow work with no transaction open, and applies the result
guarded by the task's version."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from gpuprovider.config import ProviderConfig
from gpuprovider.domain.states import TaskState
from gpuprovider.store.store import StaleTask, Store

log = logging.getLogger(__name__)
S = TaskState


class Loop:
    """Runs `tick` when woken, else after the delay the last pass asked for
    (`interval_s` when it asked for none)."""

    def __init__(self, name: str, interval_s: float):
        self.name = name
        self.interval_s = interval_s
        self.woken = False  # whether the current pass was woken rather than timed
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    def tick(self) -> float | None:
        """One pass. May return how soon it wants the next one."""
        raise NotImplementedError

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            self.woken = self._wake.is_set()
            self._wake.clear()
            try:
                soon = self.tick()
            except Exception:
                log.exception("%s loop pass failed; retrying on the next pass", self.name)
                soon = None
            timeout = self.interval_s if soon is None else max(0.0, soon)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)


class ReaperLoop(Loop):
    """Expires tasks queued past their deadline."""

    def __init__(self, store: Store, config: ProviderConfig):
        super().__init__("reaper", config.reaper.interval_s)
        self.store = store

    def tick(self) -> float | None:
        for task in self.store.tasks(states=[S.QUEUED], deadline_before=time.time()):
            reason = (
                f"queued past its deadline ({task.task_spec.max_queue_s:g}s); "
                f"last reason: {task.state_reason}"
            )
            try:
                with self.store.tx() as tx:
                    tx.transition(task, S.EXPIRED, reason)
            except StaleTask:
                continue  # placed or cancelled meanwhile
        return None
