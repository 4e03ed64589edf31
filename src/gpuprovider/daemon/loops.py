"""The daemon's loops share one shape: a pass when woken or on a timer, each loop on a
thread of its own, so that no store or backend call ever runs on the thread that
serves the API. A pass reads in a short transaction, does slow work with no
transaction open, and applies the result guarded by the task's version."""

from __future__ import annotations

import logging
import threading
import time

from gpuprovider.backends.base import Backend, NodeDown
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


SWEEP_EVERY_S = 60.0  # how often ended tasks' work folders past their kept period go


class ReaperLoop(Loop):
    """Expires tasks queued past their deadline, removes ended tasks' work folders once
    their kept period is over, fires pipeline stages' timers when due (woken when one
    is set), and checkpoints the store's log (so that no commit ever does)."""

    def __init__(
        self,
        store: Store,
        config: ProviderConfig,
        backend: Backend | None = None,
        timers: PipelineTimers | None = None,
    ):
        super().__init__("reaper", config.reaper.interval_s)
        self.store = store
        self.backend = backend
        self.timers = timers
        self.keep_work_s = config.files.keep_work_h * 3600
        self.swept_upto = 0.0  # tasks that ended before this had their folders removed
        self.sweep_at = 0.0

    def sweep(self, now: float) -> int:
        """Remove the work folders of tasks that ended more than the kept period ago (a
        node that does not answer is asked again at the next sweep); how many."""
        if self.backend is None:
            return 0
        upto = now - self.keep_work_s
        with self.store.read() as r:
            ended = r.tasks.finished_between(self.swept_upto, upto)
        for task in ended:
            try:
                self.backend.remove_work(task.node_id or "", task.run_dir or "")
            except NodeDown:
                return 0  # from this task on, next time
            self.swept_upto = task.finished_at or self.swept_upto
        self.swept_upto = upto
        return len(ended)

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
        now = time.time()
        if now >= self.sweep_at:
            self.sweep_at = now + min(SWEEP_EVERY_S, self.keep_work_s)
            self.sweep(now)
        soon = self.timers.tick() if self.timers is not None else None
        self.store.checkpoint()
        return None if soon is None else min(soon, self.interval_s)
