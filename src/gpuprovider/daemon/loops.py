"""The daemon's loops share one shape: a pass when woken or on a timer, each loop on a
thread of its own, so that no store or backend call ever runs on the thread that
serves the API. A pass reads in a short transaction, does slow work with no
transaction open, and applies the result guarded by the task's version."""

from __future__ import annotations

import logging
import threading
import time

from gpuprovider.config import ProviderConfig
from gpuprovider.domain.states import TaskState
from gpuprovider.lifecycle.kernel import Stale
from gpuprovider.lifecycle.tasks import transition
from gpuprovider.service.pipelines import PipelineTimers
from gpuprovider.store.store import Store

log = logging.getLogger(__name__)
S = TaskState


class Loop:
    """Runs `tick` when woken, else after the delay the last pass asked for
    (`interval_s` when it asked for none). `wake` may be called from any thread."""

    def __init__(self, name: str, interval_s: float):
        self.name = name
        self.interval_s = interval_s
        self.woken = False  # whether the current pass was woken rather than timed
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def wake(self, *_: object) -> None:
        self._wake.set()

    def tick(self) -> float | None:
        """One pass. May return how soon it wants the next one."""
        raise NotImplementedError

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        soon: float | None = 0.0
        while not self._stopping.is_set():
            timeout = self.interval_s if soon is None else max(0.0, soon)
            self.woken = self._wake.wait(timeout)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                soon = self.tick()
            except Exception:
                log.exception("%s loop pass failed; retrying on the next pass", self.name)
                soon = None


class ReaperLoop(Loop):
    """Expires tasks queued past their deadline, fires pipeline stages' timers when due
    (woken when one is set), and checkpoints the store's log (so that no commit ever
    does)."""

    def __init__(self, store: Store, config: ProviderConfig, timers: PipelineTimers | None = None):
        super().__init__("reaper", config.reaper.interval_s)
        self.store = store
        self.timers = timers

    def tick(self) -> float | None:
        with self.store.read() as r:
            overdue = r.tasks.find(states=[S.QUEUED], deadline_before=time.time())
        for task in overdue:
            reason = (
                f"queued past its deadline ({task.task_spec.max_queue_s:g}s); "
                f"last reason: {task.state_reason}"
            )
            try:
                with self.store.tx() as tx:
                    transition(tx, task, S.EXPIRED, reason)
            except Stale:
                continue  # placed or cancelled meanwhile
        soon = self.timers.tick() if self.timers is not None else None
        self.store.checkpoint()
        return None if soon is None else min(soon, self.interval_s)
