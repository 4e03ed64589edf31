"""The executor loop: starts placed tasks through a backend, watches them, stops
them, and records how they ended (retries, restarts, preemptions, gangs)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from gpuprovider.backends.base import Backend, Exit, Handle, Launch, NodeDown
from gpuprovider.backends.container import container_argv, container_engine
from gpuprovider.config import ProviderConfig
from gpuprovider.daemon.loops import Loop
from gpuprovider.domain.spec import TaskSpec
from gpuprovider.domain.states import TaskState
from gpuprovider.service.gangs import STOPPING, release_gang
from gpuprovider.store.records import NodeRecord, TaskRecord
from gpuprovider.store.store import StaleTask, Store, Tx

log = logging.getLogger(__name__)
S = TaskState

# Set by the provider for each task, never taken from the daemon's own environment.
_VISIBILITY_ENV = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")
_PROVIDER_ENV = frozenset({"PORT", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", *_VISIBILITY_ENV})


def _set_by_provider(key: str) -> bool:
    return key in _PROVIDER_ENV or key.startswith("GPUPROVIDER_")


# How often the executor re-reads live tasks from the store when nothing woke it.
RESYNC_S = 5.0
# How long past its grace period a stopping task may take before it is killed.
KILL_AFTER_GRACE_S = 5.0


def fail_and_maybe_retry(tx: Tx, task: TaskRecord, spec: TaskSpec, ended: Exit) -> None:
    """After a failure: queue the next attempt, restart a service, or stay failed."""
    tx.transition(task, S.FAILED, ended.reason, exit_code=ended.exit_code)
    delay = spec.retry.delay_s(task.attempt)
    if spec.kind == "service":
        why = f"service restarting in {delay:g}s after it {ended.reason}"
    elif task.attempt - task.preemptions < spec.retry.attempts:  # preemption is no failure
        why = f"retry: attempt {task.attempt + 1} of {spec.retry.attempts} in {delay:g}s"
    else:
        return
    tx.transition(
        task, S.QUEUED, why, not_before=tx.now + delay, node_id=None, pid=None, pid_start_time=None
    )


class ExecutorLoop(Loop):
    def __init__(
        self,
        store: Store,
        backend: Backend,
        config: ProviderConfig,
        tasks_dir: Path,
        on_freed: Callable[[], None],
    ):
        super().__init__("executor", RESYNC_S)
        self.store = store
        self.backend = backend
        self.tasks_dir = tasks_dir
        self.on_freed = on_freed
        self.grace_s = config.executor.stop_grace_s
        # Task id -> when to kill it if it has not stopped; memory only, since a
        # restarted daemon simply sends the (idempotent) stop again.
        self._kill_at: dict[str, float] = {}
        # Live tasks polled every `poll_interval_s` with no store access; re-read
        # from the store when woken (placement, cancel) and every RESYNC_S.
        self._watched: dict[str, TaskRecord] = {}
        self._resync_at = 0.0
        self.poll_interval_s = config.executor.poll_interval_s

    def tick(self) -> float | None:
        now = time.monotonic()
        if self.woken or now >= self._resync_at:
            self._resync_at = now + self.interval_s
            placed = self.store.tasks(states=[S.SCHEDULED])
            if placed:
                nodes = {n.id: n for n in self.store.nodes()}  # once per pass, not per task
                for task in placed:
                    self._start(task, nodes)
            live = self.store.tasks(states=[S.STARTING, S.RUNNING, S.CANCELLING, S.PREEMPTED])
            self._watched = {t.id: t for t in live}
        freed = False
        watching: list[tuple[TaskRecord, Handle]] = []
        for task in list(self._watched.values()):
            handle = self._handle(task)
            if handle is None:
                self._never_started(task)
                del self._watched[task.id]
                freed = True
            else:
                watching.append((task, handle))
        # one call for every task: a remote backend asks all its nodes at once
        ended = self.backend.poll_many([handle for _, handle in watching]) if watching else []
        for (task, handle), result in zip(watching, ended, strict=True):
            if self._settle(task, handle, result):
                del self._watched[task.id]
                freed = True
        if freed:
            self.on_freed()
        return self.poll_interval_s if self._watched else None

    # -- start -----------------------------------------------------------------

    def _env(
        self,
        task: TaskRecord,
        spec: TaskSpec,
        gpu_indices: list[int],
        gpu_milli: int,
        ports: dict[str, int],
    ) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not _set_by_provider(k)}
        env.update(spec.env)
        visible = ",".join(map(str, gpu_indices))
        env["CUDA_VISIBLE_DEVICES"] = visible
        env["NVIDIA_VISIBLE_DEVICES"] = visible or "none"
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # indices as NVML numbers them
        env["GPUPROVIDER_TASK_ID"] = task.id
        env["GPUPROVIDER_ATTEMPT"] = str(task.attempt)
        if gpu_indices and gpu_milli < 1000:
            env["GPUPROVIDER_GPU_SHARE"] = f"{gpu_milli / 1000:g}"
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(max(1, gpu_milli // 10))
        for i, (name, port) in enumerate(ports.items()):
            if i == 0:
                env["PORT"] = str(port)
            env[f"GPUPROVIDER_PORT_{name.upper()}"] = str(port)
        return env

    def _start(self, task: TaskRecord, nodes: dict[str, NodeRecord]) -> None:
        spec = task.task_spec
        alloc = self.store.allocation(task.id)
        run_dir = self.tasks_dir / task.id
        try:
            with self.store.tx() as tx:
                tx.transition(
                    task, S.STARTING, "starting", attempt=task.attempt + 1, run_dir=str(run_dir)
                )
        except StaleTask:
            return
        node = nodes.get(alloc.node_id)
        gpus = [g for g in node.gpus if g.uuid in alloc.gpu_uuids] if node else []
        indices = sorted(g.idx for g in gpus)
        env = self._env(task, spec, indices, alloc.gpu_milli, alloc.ports)
        argv = list(spec.command or [])
        workdir = spec.workdir or str(run_dir / "work")
        if spec.image:
            real_gpus = bool(gpus) and not any(g.simulated for g in gpus)
            passed = set(spec.env) | {k for k in env if _set_by_provider(k)}
            if real_gpus:  # the engine maps the devices; inside they count from 0
                passed -= set(_VISIBILITY_ENV)
            argv = container_argv(
                container_engine() or "docker",
                f"gpuprovider-{task.id}-{task.attempt}",
                spec.image,
                argv,
                sorted(passed),
                indices,
                real_gpus,
                alloc.ports,
                spec.workdir,
            )
            workdir = str(run_dir / "work")
        launch = Launch(
            task_id=task.id,
            attempt=task.attempt,
            argv=argv,
            env=env,
            workdir=workdir,
            run_dir=str(run_dir),
            max_duration_s=spec.max_duration_s,
            grace_s=self.grace_s,
            node_id=alloc.node_id,
        )
        try:
            handle = self.backend.start(launch)
        except OSError as exc:
            if isinstance(exc, NodeDown):
                self._node_down(exc.node_id, str(exc))
            with self.store.tx() as tx:
                tx.release(task.id)
                fail_and_maybe_retry(tx, task, spec, Exit(None, f"could not start: {exc}"))
            self.on_freed()
            return
        self._mark_running(task, handle, f"running as pid {handle.pid}")

    def _mark_running(self, task: TaskRecord, handle: Handle, why: str) -> None:
        with self.store.tx() as tx:
            tx.transition(
                task,
                S.RUNNING,
                why,
                pid=handle.pid,
                pid_start_time=handle.start_time,
                started_at=tx.now,
            )

    # -- watch -----------------------------------------------------------------

    def _handle(self, task: TaskRecord) -> Handle | None:
        if task.pid is not None and task.run_dir is not None:
            return Handle(
                task.pid, task.pid_start_time or 0.0, task.run_dir, task.attempt, task.node_id or ""
            )
        if task.state == S.STARTING and task.run_dir is not None:
            # The daemon died between starting the runner and recording it.
            handle = self.backend.recover(task.run_dir, task.attempt, task.node_id or "")
            if handle is not None:
                self._mark_running(task, handle, f"re-adopted pid {handle.pid} after a restart")
            return handle
        return None

    def _never_started(self, task: TaskRecord) -> None:
        if task.state in STOPPING:
            self._finish(task, Exit(None, "never started"))
        else:
            self._finish(task, Exit(None, "lost: the daemon stopped while starting it", lost=True))

    def _settle(self, task: TaskRecord, handle: Handle, ended: Exit | None) -> bool:
        """Act on one task's poll; True when its resources were freed."""
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
        if self.store.set_node_status(node_id, "unreachable", why):
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
        spec = task.task_spec
        try:
            with self.store.tx() as tx:
                tx.release(task.id)
                if task.state == S.CANCELLING:
                    tx.transition(
                        task,
                        S.CANCELLED,
                        f"cancelled; it {ended.reason}",
                        exit_code=ended.exit_code,
                    )
                    release_gang(self.store, tx, task, f"gang member {task.label} was cancelled")
                elif task.state == S.PREEMPTED:
                    tx.transition(
                        task,
                        S.QUEUED,
                        f"re-queued after preemption; it {ended.reason}",
                        preemptions=task.preemptions + 1,
                        not_before=tx.now,
                        node_id=None,
                        pid=None,
                        pid_start_time=None,
                    )
                elif spec.kind == "job" and ended.succeeded:
                    tx.transition(task, S.SUCCEEDED, ended.reason, exit_code=ended.exit_code)
                else:
                    fail_and_maybe_retry(tx, task, spec, ended)
                    release_gang(
                        self.store,
                        tx,
                        task,
                        f"gang member {task.label} {ended.reason}",
                        restart=task.state == S.QUEUED,
                    )
        except StaleTask:
            log.info("task %s changed while finishing; the next pass decides again", task.id)
