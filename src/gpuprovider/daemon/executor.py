"""The executor loop: starts placed tasks through a backend, watches them, stops
them, and reports how they ended to the lifecycle (which decides what follows)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gpuprovider.backends.base import Backend, Exit, Handle, NodeDown, NoFreePort
from gpuprovider.backends.launch import build_launch
from gpuprovider.config import ProviderConfig
from gpuprovider.daemon.loops import Loop
from gpuprovider.domain.records import AllocationRecord, NodeRecord, TaskRecord
from gpuprovider.domain.states import STOPPING, TaskState
from gpuprovider.lifecycle import nodes as node_lifecycle
from gpuprovider.lifecycle import tasks as lifecycle
from gpuprovider.store.store import Store
from gpuprovider.store.tasks import StaleTask

log = logging.getLogger(__name__)
S = TaskState

# How often the executor re-reads live tasks from the store when nothing woke it.
RESYNC_S = 5.0
# How long past its grace period a stopping task may take before it is killed.
KILL_AFTER_GRACE_S = 5.0
LIVE = [S.STARTING, S.RUNNING, S.CANCELLING, S.PREEMPTED]


class ExecutorLoop(Loop):
    def __init__(
        self,
        store: Store,
        backend: Backend,
        config: ProviderConfig,
        tasks_dir: Path,
        container_engine: Callable[[], str | None],
    ):
        super().__init__("executor", RESYNC_S)
        self.store = store
        self.backend = backend
        self.tasks_dir = tasks_dir
        self.container_engine = container_engine
        self.grace_s = config.executor.stop_grace_s
        self.port_range = config.executor.port_range
        # Task id -> when to kill it if it has not stopped; memory only, since a
        # restarted daemon simply sends the (idempotent) stop again.
        self._kill_at: dict[str, float] = {}
        # Live tasks polled every `poll_interval_s` (and whenever a runner ends) with
        # no store access; re-read from the store when work is placed or must stop,
        # and every RESYNC_S.
        self._watched: dict[str, TaskRecord] = {}
        self._resync = threading.Event()
        self._resync_at = 0.0
        self.poll_interval_s = config.executor.poll_interval_s

    def resync(self, _: object = None) -> None:
        """Work was placed or must stop: read the store on the next pass."""
        self._resync.set()
        self.wake()

    def tick(self) -> float | None:
        now = time.monotonic()
        if self._resync.is_set() or now >= self._resync_at:
            self._resync.clear()
            self._resync_at = now + self.interval_s
            with self.store.read() as r:
                placed = r.tasks.find(states=[S.SCHEDULED])
                if placed:  # once per pass, not per task
                    nodes = {n.id: n for n in r.nodes.list(removed=True)}
                    allocations = r.tasks.active_allocations()
            for task in placed:
                self._start(task, nodes, allocations)
            with self.store.read() as r:
                self._watched = {t.id: t for t in r.tasks.find(states=LIVE)}
        watching: list[tuple[TaskRecord, Handle]] = []
        for task in list(self._watched.values()):
            handle = self._handle(task)
            if handle is None:
                self._never_started(task)
                del self._watched[task.id]
            else:
                watching.append((task, handle))
        # one call for every task: a remote backend asks all its nodes at once
        ended = self.backend.poll_many([handle for _, handle in watching]) if watching else []
        for (task, handle), result in zip(watching, ended, strict=True):
            if self._settle(task, handle, result):
                del self._watched[task.id]
        return self.poll_interval_s if self._watched else None

    # -- start -----------------------------------------------------------------------

    def _start(
        self, task: TaskRecord, nodes: dict[str, NodeRecord], allocations: list[AllocationRecord]
    ) -> None:
        mine = next((a for a in allocations if a.task_id == task.id), None)
        if mine is None:  # never written so; placed again rather than stuck
            with contextlib.suppress(StaleTask), self.store.tx() as tx:
                lifecycle.transition(tx, task, S.QUEUED, "scheduled without an allocation")
            return
        run_dir = str(self.tasks_dir / task.id)
        try:
            with self.store.tx() as tx:
                lifecycle.transition(tx, task, S.STARTING, "starting", run_dir=run_dir)
        except StaleTask:
            return
        node = nodes.get(mine.node_id)
        gpus = [g for g in node.gpus if g.uuid in mine.gpu_uuids] if node else []
        taken = [
            port
            for a in allocations
            if a.node_id == mine.node_id and a.task_id != task.id
            for port in a.ports.values()
        ]
        launch = build_launch(
            task,
            mine,
            gpus,
            run_dir,
            self.grace_s,
            self.port_range,
            taken,
            self.container_engine(),
        )
        try:
            handle = self.backend.start(launch)
        except (NodeDown, NoFreePort) as exc:
            if isinstance(exc, NodeDown):
                self._node_down(exc.node_id, str(exc))
            self._start_failed(task, str(exc), task_at_fault=False)
            return
        except OSError as exc:
            self._start_failed(task, str(exc), task_at_fault=True)
            return
        self._record_process(task, handle, f"running as pid {handle.pid}")

    def _start_failed(self, task: TaskRecord, why: str, task_at_fault: bool) -> None:
        for _ in range(3):
            try:
                with self.store.tx() as tx:
                    lifecycle.start_failed(tx, task, why, task_at_fault)
                return
            except StaleTask:
                with self.store.read() as r:
                    task = r.tasks.get(task.id)

    def _record_process(self, task: TaskRecord, handle: Handle, why: str) -> None:
        """A runner started: the task runs; if it was cancelled while starting, its
        process is recorded so the next pass stops it."""
        for _ in range(3):
            try:
                with self.store.tx() as tx:
                    if handle.ports:
                        tx.tasks.set_ports(task.id, handle.ports)
                    if task.state == S.STARTING:
                        lifecycle.transition(
                            tx,
                            task,
                            S.RUNNING,
                            why,
                            pid=handle.pid,
                            pid_start_time=handle.start_time,
                        )
                    else:
                        tx.tasks.write_fields(
                            task, pid=handle.pid, pid_start_time=handle.start_time
                        )
                return
            except StaleTask:
                with self.store.read() as r:
                    task = r.tasks.get(task.id)

    # -- watch -----------------------------------------------------------------------

    def _handle(self, task: TaskRecord) -> Handle | None:
        if task.pid is not None and task.run_dir is not None:
            return Handle(
                task.pid, task.pid_start_time or 0.0, task.run_dir, task.attempt, task.node_id or ""
            )
        if task.run_dir is not None and task.attempt > 0:
            # The daemon died between starting the runner and recording it.
            handle = self.backend.recover(task.run_dir, task.attempt, task.node_id or "")
            if handle is not None:
                self._record_process(task, handle, f"re-adopted pid {handle.pid} after a restart")
            return handle
        return None

    def _never_started(self, task: TaskRecord) -> None:
        if task.state in STOPPING:
            self._finish(task, Exit(None, "never started"))
        else:
            self._finish(task, Exit(None, "lost: the daemon stopped while starting it", lost=True))

    def _settle(self, task: TaskRecord, handle: Handle, ended: Exit | None) -> bool:
        """Act on one task's poll; True when it is done with."""
        if ended is None:
            if task.state in STOPPING:
                self._stop(task, handle)
            return False
        self._kill_at.pop(task.id, None)
        if down := ended.details.get("node_down"):
            self._node_down(down, ended.reason)
        self._finish(task, ended)
        return True

    def _node_down(self, node_id: str, why: str) -> None:
        """Nothing new lands on a node found dead, even before the inventory says so."""
        with self.store.tx() as tx:
            if node_lifecycle.node_lost(tx, node_id, why):
                log.warning("node %s is down: %s", node_id, why)

    def _stop(self, task: TaskRecord, handle: Handle) -> None:
        kill_at = self._kill_at.get(task.id)
        if kill_at is None:
            if self.backend.stop(handle):
                self._kill_at[task.id] = time.time() + self.grace_s + KILL_AFTER_GRACE_S
        elif time.time() > kill_at:
            log.warning("task %s did not stop within its grace period; killing it", task.id)
            self.backend.kill(handle)

    def _finish(self, task: TaskRecord, ended: Exit) -> None:
        try:
            with self.store.tx() as tx:
                lifecycle.process_ended(tx, task, ended)
        except StaleTask:
            log.info("task %s changed while finishing; the next pass decides again", task.id)
            self.resync()
