"""The task state machine of DESIGN.md, as one table."""

from __future__ import annotations

from enum import StrEnum


class TaskState(StrEnum):
    SUBMITTED = "submitted"
    QUEUED = "queued"
    SCHEDULED = "scheduled"
    STARTING = "starting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PREEMPTED = "preempted"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


S = TaskState

# Every allowed transition. `failed -> queued` is a retry (attempts left, or a
# service being restarted); `preempted -> queued` puts evicted work back;
# `starting -> queued` is a start that never happened through no fault of the task
# (its node died, no port was free): it does not count as an attempt.
TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    S.SUBMITTED: frozenset({S.QUEUED, S.CANCELLING}),
    S.QUEUED: frozenset({S.SCHEDULED, S.EXPIRED, S.CANCELLING}),
    S.SCHEDULED: frozenset({S.STARTING, S.QUEUED, S.CANCELLING}),
    S.STARTING: frozenset({S.RUNNING, S.FAILED, S.QUEUED, S.CANCELLING}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.PREEMPTED, S.CANCELLING}),
    S.FAILED: frozenset({S.QUEUED}),
    S.PREEMPTED: frozenset({S.QUEUED, S.CANCELLING}),
    S.CANCELLING: frozenset({S.CANCELLED}),
    S.SUCCEEDED: frozenset(),
    S.CANCELLED: frozenset(),
    S.EXPIRED: frozenset(),
}

# Done for good. A failure that is retried goes `failed -> queued` in the same
# transaction, so a task seen `failed` at rest has no retry coming.
TERMINAL = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.EXPIRED})

# Live states with a process (or one being started) to stop before the task moves on.
STOPPING = frozenset({S.CANCELLING, S.PREEMPTED})
# Live states in which no process exists: a cancel ends the task at once.
NOT_STARTED = frozenset({S.SUBMITTED, S.QUEUED, S.SCHEDULED})
# States that hold no resources: entering one releases the task's allocation.
UNALLOCATED = frozenset({S.QUEUED, *TERMINAL})
# States in which a task may hold an allocation (placed, until it is released).
ALLOCATED = frozenset(S) - UNALLOCATED - {S.SUBMITTED}
