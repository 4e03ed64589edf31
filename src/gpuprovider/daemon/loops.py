"""The daemon's loops. Each reads in a short transaction, does slow work with no
transaction open, and applies the result guarded by the task's version."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

from gpuprovider.backends.base import Backend, Exit, Handle, Launch
from gpuprovider.backends.container import container_argv, container_engine
from gpuprovider.config import ProviderConfig, QuotaConfig
from gpuprovider.domain.spec import TaskSpec
from gpuprovider.domain.states import TaskState
from gpuprovider.scheduler import Framework, Placement, Preemption, RunningTask, Snapshot
from gpuprovider.scheduler.fragmentation import TypicalTasks
from gpuprovider.service.gangs import STOPPING, release_gang
from gpuprovider.service.placement import build_snapshot, choose_ports, task_request
from gpuprovider.store.records import AllocationRecord, NodeRecord, TaskRecord
from gpuprovider.store.store import StaleTask, Store, Tx

log = logging.getLogger(__name__)
S = TaskState

# Set by the provider for each task, never taken from the daemon's own environment.
_VISIBILITY_ENV = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")
_PROVIDER_ENV = frozenset({"PORT", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", *_VISIBILITY_ENV})


def _set_by_provider(key: str) -> bool:
    return key in _PROVIDER_ENV or key.startswith("GPUPROVIDER_")


# How many recent submissions fragmentation-aware policies take as typical.
TYPICAL_TASK_WINDOW = 1000
# How often the executor re-reads live tasks from the store when nothing woke it.
RESYNC_S = 5.0
# How long past its grace period a stopping task may take before it is killed.
KILL_AFTER_GRACE_S = 5.0


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


class SchedulerLoop(Loop):
    """Places queued tasks. A submission costs a pass over that task alone; all
    queued tasks are reconsidered when capacity may have grown, when a backoff
    ends, and every `interval_s` as a safety net."""

    def __init__(
        self, store: Store, framework: Framework, config: ProviderConfig, on_placed: Callable
    ):
        super().__init__("scheduler", config.scheduler.interval_s)
        self.store = store
        self.framework = framework
        self.port_range = config.executor.port_range
        self.quotas = config.quotas
        self.on_placed = on_placed
        # Bumped whenever capacity may have grown (a task ended, a node changed).
        # A task found unplaceable is not tried again until it moves.
        self.generation = 0
        self._unplaceable_at: dict[str, int] = {}
        self._submitted: set[str] = set()
        self._full_pass_due = 0.0
        self._backoff_ends: float | None = None
        self._nodes: list[NodeRecord] = []  # refreshed on every full pass

    def submitted(self, task_id: str) -> None:
        self._submitted.add(task_id)
        self.wake()

    def capacity_changed(self) -> None:
        self.generation += 1
        self._full_pass_due = 0.0
        self.wake()

    def tick(self) -> float | None:
        now = time.time()
        if now >= self._full_pass_due or (self._backoff_ends and now >= self._backoff_ends):
            self._full_pass_due = now + self.interval_s
            self._submitted.clear()
            self._nodes = self.store.nodes()
            if self.framework.policy.needs_typical_tasks:
                self.framework.typical = self._typical_tasks()
            queued = self.store.queued_brief()
            self._unplaceable_at = {k: g for k, g in self._unplaceable_at.items() if k in queued}
            waiting = [t for t in queued.values() if t > now]
            self._backoff_ends = min(waiting) if waiting else None
            candidates = [
                task_id
                for task_id, not_before in queued.items()
                if not_before <= now and self._unplaceable_at.get(task_id) != self.generation
            ]
            partial = False
        else:
            candidates, self._submitted = list(self._submitted), set()
            partial = True
        if candidates:
            ready = self.store.tasks(states=[S.QUEUED], ids=candidates)
            if partial and any(t.gang for t in ready):
                # a gang is placed as a whole: look at every queued member
                self._full_pass_due = 0.0
                return 0.0
            for task in ready:
                if task.not_before > now:
                    self._backoff_ends = min(self._backoff_ends or task.not_before, task.not_before)
            ready = [t for t in ready if t.not_before <= now]
            if ready:
                self._place(ready)
        return min(self._full_pass_due, self._backoff_ends or math.inf) - now

    def _typical_tasks(self) -> TypicalTasks | None:
        """The shapes of the latest submissions, for fragmentation-aware policies."""
        recent = self.store.tasks(limit=TYPICAL_TASK_WINDOW, newest_first=True)
        if not recent:
            return None
        return TypicalTasks.from_tasks(task_request(t.id, t.task_spec) for t in recent)

    def _place(self, ready: list[TaskRecord]) -> None:
        specs = {t.id: t.task_spec for t in ready}
        allocations = self.store.active_allocations()
        holders = {t.id: t for t in self.store.tasks(ids=[a.task_id for a in allocations])}
        quota = QuotaBook(self.quotas, allocations, holders)
        # Guaranteed work first, by priority; work beyond its tenant's quota ranks last.
        ready.sort(key=lambda t: (-t.priority, t.created_at))
        over_quota = {t.id: quota.admit(t.tenant, specs[t.id]) for t in ready}
        ready.sort(key=lambda t: (-effective_priority(t.priority, over_quota[t.id]), t.created_at))
        requests = [
            task_request(
                t.id, specs[t.id], effective_priority(t.priority, over_quota[t.id]), t.gang
            )
            for t in ready
        ]
        snapshot = build_snapshot(self._nodes, allocations)
        snapshot.running = running_work(allocations, holders)
        decisions = self.framework.place(snapshot, requests)
        taken_ports: dict[str, set[int]] = {}
        for alloc in allocations:
            taken_ports.setdefault(alloc.node_id, set()).update(alloc.ports.values())
        notes: list[tuple[TaskRecord, str]] = []
        placed = preempted = 0
        for task, decision in zip(ready, decisions, strict=True):
            if isinstance(decision, Preemption):
                preempted += self._preempt(task, decision, snapshot)
                notes.append((task, decision.reason))
                continue
            if not isinstance(decision, Placement):
                notes.append((task, decision.reason))
                continue
            ports: dict[str, int] = {}
            if specs[task.id].ports:
                taken = taken_ports.setdefault(decision.node_id, set())
                names = [p.name for p in specs[task.id].ports]
                chosen = choose_ports(names, taken, self.port_range)
                if chosen is None:
                    notes.append((task, f"no free port left in {self.port_range}"))
                    continue
                ports = chosen
                taken.update(ports.values())
            where = describe_placement(snapshot, decision)
            if over_quota[task.id]:
                where += f"; beyond tenant {task.tenant}'s quota, so preemptible"
            try:
                with self.store.tx() as tx:
                    tx.allocate(
                        task,
                        decision.node_id,
                        decision.gpu_uuids,
                        decision.gpu_milli,
                        decision.cpu_milli,
                        decision.memory_mib,
                        ports,
                        over_quota[task.id],
                    )
                    tx.transition(task, S.SCHEDULED, f"placed on {where}", node_id=decision.node_id)
                placed += 1
            except StaleTask:
                continue  # cancelled meanwhile; its reservation is simply not written
        changed = [(task, why) for task, why in notes if task.state_reason != why]
        for task, _ in notes:
            if not task.gang:  # a gang may become placeable when a member arrives
                self._unplaceable_at[task.id] = self.generation
        if changed:
            with self.store.tx() as tx:  # reasons only: one transaction for the pass
                for task, why in changed:
                    tx.note(task, why)
        if placed or preempted:
            self.on_placed()

    def _preempt(self, task: TaskRecord, decision: Preemption, snapshot: Snapshot) -> int:
        """Move the victims to `preempted`; the executor stops them and re-queues them."""
        node = snapshot.node(decision.node_id).name
        done = 0
        for victim_id in decision.victims:
            victim = self.store.task(victim_id)
            if victim is None or victim.state != S.RUNNING:
                continue
            why = f"preempted by {task.label} (priority {task.priority}) to make room on {node}"
            try:
                with self.store.tx() as tx:
                    tx.transition(victim, S.PREEMPTED, why)
                done += 1
            except StaleTask:
                continue
        return done


# Work beyond its tenant's quota ranks below every guaranteed task.
OVER_QUOTA_PENALTY = 10_000


def effective_priority(priority: int, over_quota: bool) -> int:
    return priority - OVER_QUOTA_PENALTY if over_quota else priority


class QuotaBook:
    """GPUs each tenant holds, against its quota (none configured: no limit)."""

    def __init__(
        self,
        quotas: dict[str, QuotaConfig],
        allocations: list[AllocationRecord],
        holders: dict[str, TaskRecord],
    ):
        self.limit_milli = {tenant: int(q.gpus * 1000) for tenant, q in quotas.items()}
        self.used_milli: dict[str, int] = {}
        for alloc in allocations:
            holder = holders.get(alloc.task_id)
            if holder is not None and not alloc.over_quota:
                self.used_milli[holder.tenant] = self.used_milli.get(
                    holder.tenant, 0
                ) + alloc.gpu_milli * len(alloc.gpu_uuids)

    def admit(self, tenant: str, spec: TaskSpec) -> bool:
        """Count the task against its tenant; True if that takes the tenant over quota."""
        limit = self.limit_milli.get(tenant)
        gpu = spec.gpu
        want = gpu.milli_per_gpu * gpu.gpus_touched if gpu.wants_gpu else 0
        if limit is None or want == 0:
            return False
        used = self.used_milli.get(tenant, 0)
        if used + want > limit:
            return True
        self.used_milli[tenant] = used + want
        return False


def running_work(
    allocations: list[AllocationRecord], holders: dict[str, TaskRecord]
) -> list[RunningTask]:
    """Running tasks as preemption candidates: preemptible if their spec says so or
    they run beyond their tenant's quota."""
    work = []
    for alloc in allocations:
        holder = holders.get(alloc.task_id)
        if holder is None or holder.state != S.RUNNING:
            continue
        spec = holder.task_spec
        work.append(
            RunningTask(
                task_id=holder.id,
                node_id=alloc.node_id,
                gpu_uuids=tuple(alloc.gpu_uuids),
                gpu_milli=alloc.gpu_milli,
                cpu_milli=alloc.cpu_milli,
                memory_mib=alloc.memory_mib,
                priority=effective_priority(holder.priority, alloc.over_quota),
                preemptible=spec.preemptible or alloc.over_quota,
                started_at=holder.started_at or 0.0,
            )
        )
    return work


def describe_placement(snapshot: Snapshot, decision: Placement) -> str:
    """`node-a, GPU 0,1` or `node-a, GPU 2 (0.5 share)`, for events."""
    node = snapshot.node(decision.node_id)
    if not decision.gpu_uuids:
        return node.name
    indices = [g.index for g in node.gpus if g.uuid in decision.gpu_uuids]
    where = f"{node.name}, GPU {','.join(map(str, indices))}"
    if decision.gpu_milli < 1000:
        where += f" ({decision.gpu_milli / 1000:g} share)"
    return where


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
            for task in self.store.tasks(states=[S.SCHEDULED]):
                self._start(task)
            live = self.store.tasks(states=[S.STARTING, S.RUNNING, S.CANCELLING, S.PREEMPTED])
            self._watched = {t.id: t for t in live}
        freed = False
        for task in list(self._watched.values()):
            if self._watch(task):
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

    def _start(self, task: TaskRecord) -> None:
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
        node = next((n for n in self.store.nodes() if n.id == alloc.node_id), None)
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
        )
        try:
            handle = self.backend.start(launch)
        except OSError as exc:
            with self.store.tx() as tx:
                tx.release(task.id)
                fail_and_maybe_retry(tx, task, spec, Exit(None, f"could not start: {exc}"))
            self.on_freed()
            return
        with self.store.tx() as tx:
            tx.transition(
                task,
                S.RUNNING,
                f"running as pid {handle.pid}",
                pid=handle.pid,
                pid_start_time=handle.start_time,
                started_at=tx.now,
            )

    # -- watch -----------------------------------------------------------------

    def _handle(self, task: TaskRecord) -> Handle | None:
        if task.pid is not None and task.run_dir is not None:
            return Handle(task.pid, task.pid_start_time or 0.0, task.run_dir, task.attempt)
        if task.state == S.STARTING and task.run_dir is not None:
            # The daemon died between starting the runner and recording it.
            handle = self.backend.recover(task.run_dir, task.attempt)
            if handle is not None:
                with self.store.tx() as tx:
                    tx.transition(
                        task,
                        S.RUNNING,
                        f"re-adopted pid {handle.pid} after a restart",
                        pid=handle.pid,
                        pid_start_time=handle.start_time,
                        started_at=tx.now,
                    )
            return handle
        return None

    def _watch(self, task: TaskRecord) -> bool:
        """Poll one task; True when its resources were freed."""
        handle = self._handle(task)
        if handle is None:
            if task.state in STOPPING:
                ended = Exit(None, "never started")
            else:
                ended = Exit(None, "lost: the daemon stopped while starting it", lost=True)
            self._finish(task, ended)
            return True
        ended = self.backend.poll(handle)
        if ended is None:
            if task.state in STOPPING:
                self._stop(task, handle)
            return False
        self._kill_at.pop(task.id, None)
        self._finish(task, ended)
        return True

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
