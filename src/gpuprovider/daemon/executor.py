"""The executor loop: starts placed tasks through a backend, watches them, stops
them, and reports how they ended to the lifecycle (which decides what follows).

Work comes in batches: the tasks placed since the last pass are marked starting in one
transaction, started, and marked running in another; the tasks found ended in a pass
are recorded in one transaction. A batch that meets a task changed meanwhile is
redone task by task."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gpuprovider.backends.base import Backend, Exit, Handle, NodeDown, NodeNotReady, NoFreePort
from gpuprovider.backends.launch import RentalLaunch, build_launch
from gpuprovider.config import ProviderConfig
from gpuprovider.daemon.loops import Loop
from gpuprovider.domain.records import AllocationRecord, GpuRecord, OwnerKind, TaskRecord
from gpuprovider.domain.rentals import RentalRecord
from gpuprovider.domain.states import STOPPING, TaskState
from gpuprovider.lifecycle import nodes as node_lifecycle
from gpuprovider.lifecycle import tasks as lifecycle
from gpuprovider.lifecycle.kernel import Stale
from gpuprovider.rentals.disks import RentalFolder
from gpuprovider.service.files import Uploads, Volumes
from gpuprovider.store.store import Store, Tx

log = logging.getLogger(__name__)
S = TaskState

# How often the executor re-reads live tasks from the store when nothing woke it.
RESYNC_S = 5.0
# How long past its grace period a stopping task may take before it is killed.
KILL_AFTER_GRACE_S = 5.0
LIVE = [S.STARTING, S.RUNNING, S.CANCELLING, S.PREEMPTED]


def rental_launch(rental: RentalRecord, rentals_dir: Path) -> RentalLaunch:
    """What the node needs to run `rental`'s environment: its folder, its ports."""
    folder = RentalFolder(rentals_dir, rental.id)
    ports = {"ssh": rental.ssh_port or 0, **rental.ports}
    return RentalLaunch(
        rental.name,
        str(folder.image),
        str(folder.mount),
        str(folder.home),
        str(folder.host_key),
        ports,
    )


class ExecutorLoop(Loop):
    def __init__(
        self,
        store: Store,
        backend: Backend,
        config: ProviderConfig,
        tasks_dir: Path,
        container_engine: Callable[[], str | None],
        uploads: Uploads | None = None,
        volumes: Volumes | None = None,
        rentals_dir: Path | None = None,
    ):
        super().__init__("executor", RESYNC_S)
        self.uploads, self.volumes = uploads, volumes
        self.store = store
        self.backend = backend
        self.tasks_dir = tasks_dir
        self.container_engine = container_engine
        self.rentals_dir = rentals_dir
        self.grace_s = config.executor.stop_grace_s
        self.port_range = config.executor.port_range
        self.container_runtime = config.executor.container_runtime
        self.container_read_only = config.executor.container_read_only
        self.poll_interval_s = config.executor.poll_interval_s
        # Task id -> when to kill it if it has not stopped; memory only, since a
        # restarted daemon simply sends the (idempotent) stop again.
        self._kill_at: dict[str, float] = {}
        # Live tasks polled every `poll_interval_s` (and whenever a runner ends) with
        # no store access; read again when tasks must stop, and every RESYNC_S.
        self._watched: dict[str, TaskRecord] = {}
        self._resync = threading.Event()
        self._resync_at = 0.0
        self._to_start: set[str] = set()  # placed since the last pass (from other threads)
        # What a launch needs of a GPU (its index, whether simulated) never changes.
        self._gpus: dict[str, GpuRecord] = {}
        self._lock = threading.Lock()

    def resync(self, _: object = None) -> None:
        """Tasks must stop (or anything else changed): read every live task again."""
        self._resync.set()
        self.wake()

    def placed(self, task_ids: set[str]) -> None:
        """Tasks were placed: start them on the next pass."""
        with self._lock:
            self._to_start |= task_ids
        self.wake()

    def tick(self) -> float | None:
        now = time.monotonic()
        with self._lock:
            to_start, self._to_start = self._to_start, set()
        full = self._resync.is_set() or now >= self._resync_at
        if full:
            self._resync.clear()
            self._resync_at = now + self.interval_s
        with self.store.read() as r:
            if full:
                placed = r.tasks.find(states=[S.SCHEDULED])
                self._watched = {t.id: t for t in r.tasks.find(states=LIVE)}
            else:
                placed = r.tasks.by_ids(to_start, state=S.SCHEDULED)
        if placed:
            self._start(placed)
        watching: list[tuple[TaskRecord, Handle]] = []
        ended: list[tuple[TaskRecord, Exit]] = []
        for task in list(self._watched.values()):
            handle = self._handle(task)
            if handle is not None:
                watching.append((task, handle))
            elif task.state == S.STARTING:  # no runner started for it: a start that failed
                self._start_failed([(task, "the daemon stopped while starting it", False)])
                del self._watched[task.id]
            else:
                ended.append((task, Exit(None, "never started")))
        # one call for every task: a remote backend asks all its nodes at once
        polled = self.backend.poll_many([handle for _, handle in watching]) if watching else []
        for (task, handle), result in zip(watching, polled, strict=True):
            if result is None:
                if task.state in STOPPING:
                    self._stop(task, handle)
                continue
            self._kill_at.pop(task.id, None)
            if down := result.details.get("node_down"):
                self._node_down(down, result.reason)
            ended.append((task, result))
        if ended:
            self._finish(ended)
        return self.poll_interval_s if self._watched else None

    # -- start -----------------------------------------------------------------------

    def _start(self, tasks: list[TaskRecord]) -> None:
        with self.store.read() as r:
            if any(t.task_spec.ports for t in tasks):  # ports others hold matter
                allocations = {a.task_id: a for a in r.tasks.active_allocations()}
            else:
                allocations = {
                    a.task_id: a for a in r.tasks.active_allocations_of(t.id for t in tasks)
                }
            wanted = {uuid for a in allocations.values() for uuid in a.gpu_uuids}
            if not wanted <= self._gpus.keys():  # a GPU not seen yet: read them all
                self._gpus = {g.uuid: g for n in r.nodes.list(removed=True) for g in n.gpus}
            rentals = {
                t.id: rental
                for t in tasks
                if t.owner_kind == OwnerKind.RENTAL
                and (rental := r.rentals.get(t.owner_id or "")) is not None
            }
        starting: list[tuple[TaskRecord, AllocationRecord]] = []
        with self.store.tx() as tx:
            for task in tasks:
                mine = allocations.get(task.id)
                try:
                    if mine is None:  # never written so; placed again rather than stuck
                        lifecycle.transition(tx, task, S.QUEUED, "scheduled without allocation")
                        continue
                    run_dir = str(self.tasks_dir / task.id)
                    lifecycle.transition(tx, task, S.STARTING, "starting", run_dir=run_dir)
                    starting.append((task, mine))
                except Stale:  # nothing was written for it: cancelled meanwhile
                    continue
        engine = self.container_engine() if any(t.task_spec.image for t, _ in starting) else None
        launches = []
        for task, mine in starting:
            gpus = [self._gpus[uuid] for uuid in mine.gpu_uuids if uuid in self._gpus]
            taken = [
                port
                for other in allocations.values()
                if other.node_id == mine.node_id and other.task_id != task.id
                for port in other.ports.values()
            ]
            launch = build_launch(
                task,
                mine,
                gpus,
                task.run_dir or "",
                self.grace_s,
                self.port_range,
                taken,
                engine,
                self.container_runtime,
                self.container_read_only,
                *self._files(task),
            )
            if task.id in rentals and self.rentals_dir is not None:
                launch.rental = rental_launch(rentals[task.id], self.rentals_dir)
            launches.append(launch)
        started: list[tuple[TaskRecord, Handle]] = []
        failed: list[tuple[TaskRecord, str, bool]] = []
        results = self.backend.start_many(launches) if launches else []
        for (task, _), result in zip(starting, results, strict=True):
            if isinstance(result, Handle):
                started.append((task, result))
            elif isinstance(result, NodeDown | NodeNotReady | NoFreePort):  # not the task's fault
                if isinstance(result, NodeDown):
                    self._node_down(result.node_id, str(result))
                failed.append((task, str(result), False))
            else:
                failed.append((task, str(result), True))
        self._record_processes(started, "running as pid {pid}")
        if failed:
            self._start_failed(failed)

    def _files(self, task: TaskRecord) -> tuple[str, list[tuple[str, str, int]]]:
        """Where the task's upload and volumes are on this machine."""
        spec = task.task_spec
        upload = ""
        if spec.upload and self.uploads is not None:
            upload = str(self.uploads.path(task.tenant, spec.upload))
        mounts = []
        if self.volumes is not None:
            for mount in spec.volumes:
                size = self.volumes.size_bytes(task.tenant, mount.name) or 0
                mounts.append((str(self.volumes.data(task.tenant, mount.name)), mount.path, size))
        return upload, mounts

    def _record_processes(self, started: list[tuple[TaskRecord, Handle]], why: str) -> None:
        """Runners started: their tasks run (a task cancelled while starting keeps its
        process on record, so that the next pass stops it)."""
        stale: list[tuple[TaskRecord, Handle]] = []
        with self.store.tx() as tx:
            for task, handle in started:
                try:
                    self._record_process(tx, task, handle, why.format(pid=handle.pid))
                except Stale:  # nothing was written for it
                    stale.append((task, handle))
        for task, handle in stale:
            for _ in range(3):
                with self.store.read() as r:
                    fresh = r.tasks.get(task.id)
                assert fresh is not None  # tasks are never deleted
                task = fresh
                try:
                    with self.store.tx() as tx:
                        self._record_process(tx, task, handle, why.format(pid=handle.pid))
                    break
                except Stale:
                    continue
        for task, _ in started:
            self._watched[task.id] = task

    @staticmethod
    def _record_process(tx: Tx, task: TaskRecord, handle: Handle, why: str) -> None:
        if task.state == S.STARTING:
            lifecycle.transition(
                tx, task, S.RUNNING, why, pid=handle.pid, pid_start_time=handle.start_time
            )
        else:
            tx.tasks.write_fields(task, pid=handle.pid, pid_start_time=handle.start_time)
        if handle.ports:
            tx.tasks.set_ports(task.id, handle.ports)

    def _start_failed(self, failed: list[tuple[TaskRecord, str, bool]]) -> None:
        for task, why, task_at_fault in failed:
            for _ in range(3):
                try:
                    with self.store.tx() as tx:
                        lifecycle.start_failed(tx, task, why, task_at_fault)
                    break
                except Stale:
                    with self.store.read() as r:
                        fresh = r.tasks.get(task.id)
                    assert fresh is not None  # tasks are never deleted
                    task = fresh

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
                self._record_processes([(task, handle)], "re-adopted pid {pid} after a restart")
            return handle
        return None

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

    def _finish(self, ended: list[tuple[TaskRecord, Exit]]) -> None:
        """Record how tasks ended, all in one transaction; if any of them changed
        meanwhile, each on its own (what follows an end can reach other tasks)."""
        task: TaskRecord | None
        for task, _ in ended:
            self._watched.pop(task.id, None)
        try:
            with self.store.tx() as tx:
                for task, result in ended:
                    lifecycle.process_ended(tx, task, result)
            return
        except Stale:
            pass
        for listed, result in ended:
            with self.store.read() as r:  # the failed batch changed records, not the store
                task = r.tasks.get(listed.id)
            if task is None or task.state not in LIVE:
                continue
            try:
                with self.store.tx() as tx:
                    lifecycle.process_ended(tx, task, result)
            except Stale:
                log.info("task %s changed while finishing; the next pass decides again", task.id)
                self.resync()
