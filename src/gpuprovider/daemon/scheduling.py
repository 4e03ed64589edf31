"""The scheduler loop: queued tasks in, placements and preemptions out, through the
placement library."""

from __future__ import annotations

import math
import threading
import time

from gpuprovider.config import ProviderConfig
from gpuprovider.daemon.loops import Loop
from gpuprovider.domain.records import NodeRecord, TaskRecord
from gpuprovider.domain.states import TaskState
from gpuprovider.domain.usability import Usability
from gpuprovider.lifecycle.kernel import Stale
from gpuprovider.lifecycle.tasks import transition
from gpuprovider.scheduler import Framework, Placement, Preemption, Snapshot
from gpuprovider.scheduler.fragmentation import TypicalTasks
from gpuprovider.service.metrics import Metrics
from gpuprovider.service.placement import build_snapshot, pinned_to, pool_of, task_request
from gpuprovider.service.quotas import QuotaBook, effective_priority, running_work
from gpuprovider.store.store import Store

S = TaskState

# How many recent submissions fragmentation-aware policies take as typical.
TYPICAL_TASK_WINDOW = 1000
# Submissions arriving within this long of the last pass wait for each other and are
# placed in one pass (a lone submission is placed at once).
BATCH_WINDOW_S = 0.005
# Why tasks wait is written at most this often, in one transaction for all of them.
NOTES_EVERY_S = 0.02


class SchedulerLoop(Loop):
    """Places queued tasks. A submission costs a pass over that task alone; all
    queued tasks are reconsidered when capacity may have grown, when a backoff
    ends, and every `interval_s` as a safety net."""

    def __init__(
        self,
        store: Store,
        framework: Framework,
        config: ProviderConfig,
        usability: Usability,
        metrics: Metrics | None = None,
    ):
        super().__init__("scheduler", config.scheduler.interval_s)
        self.metrics = metrics
        self.store = store
        self.framework = framework
        self.quotas = config.quotas
        self.usability = usability
        # Bumped whenever capacity may have grown (a task ended, a node changed).
        # A task found unplaceable is not tried again until it moves.
        self.generation = 0
        self._unplaceable_at: dict[str, int] = {}
        self._submitted: set[str] = set()  # filled from other threads: under the lock
        self._lock = threading.Lock()
        self._full_pass_due = 0.0
        self._backoff_ends: float | None = None
        self._nodes: list[NodeRecord] = []  # read again when nodes changed, and each interval
        self._nodes_stale = True
        self._nodes_read = 0.0
        self._last_pass = 0.0
        self._queued: dict[str, TaskRecord] = {}  # queued tasks as last read
        self._notes: dict[str, tuple[TaskRecord, str]] = {}  # task id -> why it waits
        self._notes_written = 0.0

    def submitted(self, task_ids: set[str]) -> None:
        with self._lock:
            self._submitted |= task_ids
        self.wake()

    def nodes_changed(self, _: object = None) -> None:
        self._nodes_stale = True
        self.capacity_changed()

    def capacity_changed(self, _: object = None) -> None:
        with self._lock:
            self.generation += 1
            self._full_pass_due = 0.0
        self.wake()

    def tick(self) -> float | None:
        since = time.monotonic() - self._last_pass
        with self._lock:
            only_submissions = self._full_pass_due > time.time()
        if self.woken and only_submissions and since < BATCH_WINDOW_S:  # let a burst gather
            time.sleep(BATCH_WINDOW_S - since)
        began = time.monotonic()
        try:
            soon = self._pass()
        finally:
            self._last_pass = time.monotonic()
            if self.metrics is not None:
                self.metrics.scheduler_pass.observe(self._last_pass - began)
        if self._notes:
            due = self._notes_written + NOTES_EVERY_S - self._last_pass
            if due <= 0:
                self._write_notes()
            else:
                soon = min(soon if soon is not None else math.inf, due)
        return soon

    def _write_notes(self) -> None:
        """Say why each task still waits (reasons only: no state changes, no events)."""
        notes, self._notes = self._notes, {}
        with self.store.tx() as tx:
            for task, why in notes.values():
                tx.tasks.note(task, why)
        self._notes_written = time.monotonic()

    def _pass(self) -> float | None:
        now = time.time()
        with self._lock:
            full = now >= self._full_pass_due or bool(
                self._backoff_ends and now >= self._backoff_ends
            )
            if full:
                self._full_pass_due = now + self.interval_s
            generation = self.generation
            submitted, self._submitted = self._submitted, set()
        if full:
            with self.store.read() as r:
                if self._nodes_stale or now - self._nodes_read >= self.interval_s:
                    self._nodes_stale, self._nodes_read = False, now
                    self._nodes = r.nodes.list()
                queued = r.tasks.queued_brief()
                changed = [k for k, (_, v) in queued.items() if self._version(k) != v]
                self._remember(r.tasks.by_ids(changed, state=S.QUEUED))
            if self.framework.policy.needs_typical_tasks:
                self.framework.typical = self._typical_tasks()
            self._queued = {k: t for k, t in self._queued.items() if k in queued}
            self._unplaceable_at = {k: g for k, g in self._unplaceable_at.items() if k in queued}
            waiting = [nb for nb, _ in queued.values() if nb > now]
            self._backoff_ends = min(waiting) if waiting else None
            ready = [
                task
                for task_id, task in self._queued.items()
                if task.not_before <= now and self._unplaceable_at.get(task_id) != generation
            ]
        else:
            with self.store.read() as r:
                fresh = r.tasks.by_ids(submitted, state=S.QUEUED)
            self._remember(fresh)
            if any(t.gang for t in fresh):
                # a gang is placed as a whole: look at every queued member
                with self._lock:
                    self._full_pass_due = 0.0
                return 0.0
            for task in fresh:
                if task.not_before > now:
                    self._backoff_ends = min(self._backoff_ends or task.not_before, task.not_before)
            ready = [t for t in fresh if t.not_before <= now]
        if ready:
            self._place(ready, generation)
        with self._lock:
            due = self._full_pass_due
        return min(due, self._backoff_ends or math.inf) - time.time()

    def _version(self, task_id: str) -> int | None:
        known = self._queued.get(task_id)
        return known.version if known is not None else None

    def _remember(self, tasks: list[TaskRecord]) -> None:
        """Queued tasks are looked at again on every full pass: their records (and
        decoded specs) are kept, and read again only once changed."""
        for task in tasks:
            self._queued[task.id] = task

    def _typical_tasks(self) -> TypicalTasks | None:
        """The shapes of the latest submissions, for fragmentation-aware policies."""
        with self.store.read() as r:
            recent = r.tasks.find(limit=TYPICAL_TASK_WINDOW, newest_first=True)
        if not recent:
            return None
        policy = self.framework.policy
        return policy.typical_tasks(task_request(t.id, t.task_spec) for t in recent)

    def _place(self, ready: list[TaskRecord], generation: int) -> None:
        specs = {t.id: t.task_spec for t in ready}
        with self.store.read() as r:
            allocations = r.tasks.active_allocations()
            holders = {t.id: t for t in r.tasks.by_ids(a.task_id for a in allocations)}
        quota = QuotaBook(self.quotas, allocations, holders)
        # Guaranteed work first, by priority; work beyond its tenant's quota ranks last.
        ready.sort(key=lambda t: (-t.priority, t.created_at))
        over_quota = {t.id: quota.admit(t.tenant, specs[t.id]) for t in ready}
        ready.sort(key=lambda t: (-effective_priority(t.priority, over_quota[t.id]), t.created_at))
        requests = [
            task_request(
                t.id,
                specs[t.id],
                effective_priority(t.priority, over_quota[t.id]),
                t.gang,
                pool_of(t),
                pinned_to(t),
            )
            for t in ready
        ]
        snapshot = build_snapshot(self._nodes, allocations, self.usability, holders=holders)
        snapshot.running = running_work(allocations, holders)
        decisions = self.framework.place(snapshot, requests)
        notes: list[tuple[TaskRecord, str]] = []
        placed: list[tuple[TaskRecord, Placement]] = []
        for task, decision in zip(ready, decisions, strict=True):
            if isinstance(decision, Preemption):
                self._preempt(task, decision, snapshot)
                notes.append((task, decision.reason))
            elif isinstance(decision, Placement):
                placed.append((task, decision))
            else:
                notes.append((task, decision.reason))
        if placed:
            with self.store.tx() as tx:  # one transaction for the pass's placements
                for task, decision in placed:
                    where = describe_placement(snapshot, decision)
                    if over_quota[task.id]:
                        where += f"; beyond tenant {task.tenant}'s quota, so preemptible"
                    waited = max(0.0, tx.now - task.updated_at)  # queued since its last change
                    try:
                        transition(
                            tx, task, S.SCHEDULED, f"placed on {where}", node_id=decision.node_id
                        )
                    except Stale:  # cancelled meanwhile: nothing written, nothing reserved
                        continue
                    if self.metrics is not None:
                        self.metrics.queue_wait.observe(waited)
                    tx.tasks.allocate(
                        task,
                        decision.node_id,
                        decision.gpu_uuids,
                        decision.gpu_milli,
                        decision.cpu_milli,
                        decision.memory_mib,
                        over_quota[task.id],
                    )
        for task, why in notes:
            if not task.gang:  # a gang may become placeable when a member arrives
                self._unplaceable_at[task.id] = generation
            if task.state_reason != why:
                self._notes[task.id] = (task, why)

    def _preempt(self, task: TaskRecord, decision: Preemption, snapshot: Snapshot) -> None:
        """Move the victims to `preempted`; the executor stops them and re-queues them."""
        node = snapshot.node(decision.node_id).name
        for victim_id in decision.victims:
            with self.store.read() as r:
                victim = r.tasks.get(victim_id)
            if victim is None or victim.state != S.RUNNING:
                continue
            # Another tenant's task is never named to the victim (its events are theirs).
            by = task.label if victim.tenant == task.tenant else "another tenant's task"
            why = f"preempted by {by} (priority {task.priority}) to make room on {node}"
            try:
                with self.store.tx() as tx:
                    transition(tx, victim, S.PREEMPTED, why)
            except Stale:
                continue


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
