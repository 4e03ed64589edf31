"""What each task transition causes, as rules bound to (from-states, to-states): the
task machine of the lifecycle kernel (`lifecycle/kernel.py`).

`transition` is the one way a task changes state: it checks the change against the
table in `domain/states.py`, lets the matching rules add to the change, writes it with
its journal row, then applies the rules' consequences, all in the caller's transaction.
A consequence may itself be a transition (a failed job retried, a cancelled gang
member's siblings stopped, the task's owner told), applied the same way. A feature that
makes a transition cause something adds a rule to `TASK_RULES`, not a branch in a loop;
a feature that owns tasks (a service, a lease) registers an owner hook (`OWNERS`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpuprovider.domain.process import Exit
from gpuprovider.domain.records import OwnerKind, TaskRecord
from gpuprovider.domain.states import (
    ALLOCATED,
    NOT_STARTED,
    STOPPING,
    TERMINAL,
    TRANSITIONS,
    UNALLOCATED,
    TaskState,
)
from gpuprovider.lifecycle.kernel import Change, Machine, Rule
from gpuprovider.store.signals import Signal
from gpuprovider.store.store import Tx

S = TaskState
TaskChange = Change[TaskState]
TaskRule = Rule[Tx, TaskRecord, TaskState]
# A failing service restarts after 1 s, 2 s, 4 s ... up to 300 s while it keeps failing
# within STABLE_RUN_S of its start: at most 6 restarts in its first minute of crashing,
# then one each 5 minutes.
SERVICE_BACKOFF_S = 1.0
SERVICE_BACKOFF_MAX_S = 300.0
STABLE_RUN_S = 600.0


def transition(tx: Tx, task: TaskRecord, target: TaskState, reason: str, **changes: Any) -> None:
    """Move `task` to `target` with a journal row saying `reason`, and apply what that
    causes. Raises IllegalTransition for a change the table forbids and Stale when the
    task changed since it was read (nothing is then written: the caller's transaction
    fails)."""
    TASKS.transition(tx, task, target, reason, **changes)


def _write(
    tx: Tx, task: TaskRecord, target: TaskState, reason: str, changes: dict[str, Any]
) -> None:
    tx.tasks.write_transition(task, target, reason, changes)


# An owner's hook hears every transition of the tasks it owns, after the task's own
# rules (a retried task is seen queued, not failed), in the same transaction.
OwnerHook = Callable[[Tx, TaskRecord, TaskChange], None]
OWNERS: dict[OwnerKind, OwnerHook] = {}


# -- the rules ------------------------------------------------------------------------


def _count_attempt(tx: Tx, task: TaskRecord) -> dict[str, Any]:
    return {"attempt": task.attempt + 1}


def _give_attempt_back(tx: Tx, task: TaskRecord) -> dict[str, Any]:
    return {"attempt": max(task.attempt - 1, 0)}


def _stamp_start(tx: Tx, task: TaskRecord) -> dict[str, Any]:
    return {"started_at": tx.now}


def _clear_placement(tx: Tx, task: TaskRecord) -> dict[str, Any]:
    return {"node_id": None, "pid": None, "pid_start_time": None}


def _count_preemption(tx: Tx, task: TaskRecord) -> dict[str, Any]:
    return {"preemptions": task.preemptions + 1, "not_before": tx.now}


def _release(tx: Tx, task: TaskRecord, change: TaskChange) -> None:
    if tx.tasks.release(task.id):
        tx.signal(Signal.CAPACITY)


def _signal(signal: Signal) -> Callable[[Tx, TaskRecord, TaskChange], None]:
    def then(tx: Tx, task: TaskRecord, change: TaskChange) -> None:
        tx.signal(signal, task.id)

    return then


def _end_unstarted(tx: Tx, task: TaskRecord, change: TaskChange) -> None:
    transition(tx, task, S.CANCELLED, f"{change.reason}; it never ran")


def service_restart(task: TaskRecord, change: TaskChange, now: float) -> tuple[float, int]:
    """How long a failed service waits before it restarts, and its crash streak: the
    failures in a row that came within STABLE_RUN_S of a start (or before one). The
    provider's backoff (1 s, doubled with each such failure, up to 300 s) holds whatever
    the spec asks: a spec may only wait longer. A run that lasted starts the streak
    again."""
    ran = 0.0
    if change.source == S.RUNNING and task.started_at is not None:
        ran = now - task.started_at
    streak = 1 if ran >= STABLE_RUN_S else task.crash_streak + 1
    floor = min(SERVICE_BACKOFF_S * 2 ** (streak - 1), SERVICE_BACKOFF_MAX_S)
    return max(task.task_spec.retry.delay_s(streak), floor), streak


def _retry(tx: Tx, task: TaskRecord, change: TaskChange) -> None:
    spec = task.task_spec
    delay = spec.retry.delay_s(task.attempt)
    changes: dict[str, Any] = {}
    if spec.kind == "service":
        delay, changes["crash_streak"] = service_restart(task, change, tx.now)
        why = f"service restarting in {delay:g}s after it {change.reason}"
    elif task.attempt - task.preemptions < spec.retry.attempts:  # preemption is no failure
        why = f"retry: attempt {task.attempt + 1} of {spec.retry.attempts} in {delay:g}s"
    else:
        return
    transition(tx, task, S.QUEUED, why, not_before=tx.now + delay, **changes)


def _gang_together(tx: Tx, task: TaskRecord, change: TaskChange) -> None:
    """A gang lives and ends together. When a member fails or is cancelled, running
    members are stopped: preempted to run again when the member restarts, else
    cancelled; members not started yet are cancelled unless it restarts."""
    if not task.gang:
        return
    restarts = task.state == S.QUEUED  # the retry rule has already re-queued it
    ended = "was cancelled" if change.target == S.CANCELLED else change.reason
    why = f"gang member {task.label} {ended}"
    for listed in tx.tasks.gang_members(task.gang):
        # read again: stopping one member may already have moved another
        sibling = tx.tasks.get(listed.id)
        if sibling is None or sibling.id == task.id:
            continue
        if sibling.state in TERMINAL or sibling.state in STOPPING:
            continue
        if sibling.state == S.RUNNING:
            transition(tx, sibling, S.PREEMPTED if restarts else S.CANCELLING, why)
        elif not restarts:
            transition(tx, sibling, S.CANCELLING, why)


def _tell_owner(tx: Tx, task: TaskRecord, change: TaskChange) -> None:
    if task.owner_kind is None:
        return
    hook = OWNERS.get(OwnerKind(task.owner_kind))
    if hook is None:  # a feature's hook not loaded: never skip an owner quietly
        raise RuntimeError(f"no owner hook for {task.owner_kind} (task {task.id})")
    hook(tx, task, change)


ANY = frozenset(S)
TASK_RULES: list[TaskRule] = [
    TaskRule(
        "count-attempt",
        "starting a task counts an attempt",
        frozenset({S.STARTING}),
        changes=_count_attempt,
    ),
    TaskRule(
        "give-attempt-back",
        "a start that never happened (node gone, no free port) counts no attempt",
        frozenset({S.QUEUED}),
        frozenset({S.STARTING}),
        changes=_give_attempt_back,
    ),
    TaskRule(
        "stamp-start",
        "a running task says since when",
        frozenset({S.RUNNING}),
        changes=_stamp_start,
    ),
    TaskRule(
        "clear-placement",
        "a re-queued task forgets its node and process",
        frozenset({S.QUEUED}),
        changes=_clear_placement,
    ),
    TaskRule(
        "count-preemption",
        "evicted work comes back at once, its preemption counted (not as a failure)",
        frozenset({S.QUEUED}),
        frozenset({S.PREEMPTED}),
        changes=_count_preemption,
    ),
    TaskRule(
        "release",
        "a task that holds nothing any more gives its allocation back",
        UNALLOCATED,
        ALLOCATED,
        then=_release,
    ),
    TaskRule(
        "wake-scheduler",
        "queued work is looked at",
        frozenset({S.QUEUED}),
        then=_signal(Signal.QUEUED),
    ),
    TaskRule(
        "wake-executor",
        "placed work is started",
        frozenset({S.SCHEDULED}),
        then=_signal(Signal.PLACED),
    ),
    TaskRule(
        "stop-process",
        "a task to stop has its process stopped",
        STOPPING,
        then=_signal(Signal.STOP),
    ),
    TaskRule(
        "cancel-unstarted",
        "a task cancelled before any process started ends at once",
        frozenset({S.CANCELLING}),
        NOT_STARTED,
        then=_end_unstarted,
    ),
    TaskRule(
        "retry",
        "a failed job with attempts left runs again after its backoff; a service always does",
        frozenset({S.FAILED}),
        then=_retry,
    ),
    TaskRule(
        "gang-together",
        "a gang member that fails or is cancelled stops the others (after the retry rule)",
        frozenset({S.FAILED, S.CANCELLED}),
        then=_gang_together,
    ),
    TaskRule(
        "tell-owner",
        "the task's owner (its service, its lease) hears of every transition, last",
        ANY,
        then=_tell_owner,
    ),
]
TASKS: Machine[Tx, TaskRecord, TaskState] = Machine(
    "task",
    TRANSITIONS,
    write=_write,
    state_of=lambda task: task.state,
    subject_of=lambda task: task.id,
    rules=TASK_RULES,
)


# -- what actors report, as transitions ----------------------------------------------


def process_ended(tx: Tx, task: TaskRecord, ended: Exit) -> None:
    """A task's process ended (or was found gone): the transition that follows."""
    if task.state == S.CANCELLING:
        transition(
            tx, task, S.CANCELLED, f"cancelled; it {ended.reason}", exit_code=ended.exit_code
        )
    elif task.state == S.PREEMPTED:
        transition(tx, task, S.QUEUED, f"re-queued after preemption; it {ended.reason}")
    elif task.kind == "job" and ended.succeeded:
        transition(tx, task, S.SUCCEEDED, ended.reason, exit_code=ended.exit_code)
    else:
        transition(tx, task, S.FAILED, ended.reason, exit_code=ended.exit_code)


def start_failed(tx: Tx, task: TaskRecord, why: str, task_at_fault: bool) -> None:
    """Starting `task` did not work. The task's own fault (a workdir that cannot be
    made) fails the attempt; the provider's (node gone, no port free) re-queues it
    without counting one."""
    if task.state != S.STARTING:  # cancelled meanwhile: nothing ran
        process_ended(tx, task, Exit(None, f"never started: {why}"))
    elif task_at_fault:
        transition(tx, task, S.FAILED, f"could not start: {why}")
    else:
        transition(
            tx, task, S.QUEUED, f"could not start: {why}; re-queued", not_before=tx.now + 1.0
        )


def request_cancel(tx: Tx, task: TaskRecord, by: str) -> None:
    transition(tx, task, S.CANCELLING, f"cancel requested by {by}")


def submit(tx: Tx, task: TaskRecord) -> None:
    transition(tx, task, S.QUEUED, "waiting for the scheduler")
