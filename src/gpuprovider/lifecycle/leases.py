"""A market lease's lifecycle on the provider: its state machine on the kernel, and
what its work's transitions cause for it (its owner hooks).

A won lease is realised as a task (a job) or a service, which the lease owns: the task
running (or the service live) makes the lease run; the work ending closes the lease
with the reason it ended, in the same transaction. A lease asked to close stops its
work, and closes once that has stopped. Every change wakes the market's reporter, which
tells the market (outside any transaction).
"""

from __future__ import annotations

from typing import Any

from gpuprovider.domain.process import failure_kind
from gpuprovider.domain.records import OwnerKind, ServiceRecord, TaskRecord
from gpuprovider.domain.services import ACTIVE as SERVICE_ACTIVE
from gpuprovider.domain.services import ServiceState
from gpuprovider.domain.states import TERMINAL as TASK_TERMINAL
from gpuprovider.domain.states import TaskState
from gpuprovider.lifecycle import services, tasks
from gpuprovider.lifecycle.kernel import Change, Machine, Rule
from gpuprovider.market.model import (
    TERMINAL,
    TRANSITIONS,
    CloseReason,
    LeaseRecord,
    LeaseState,
)
from gpuprovider.store.signals import Signal
from gpuprovider.store.store import Tx

L = LeaseState
LeaseChange = Change[LeaseState]
LeaseRule = Rule[Tx, LeaseRecord, LeaseState]


def transition(tx: Tx, lease: LeaseRecord, target: LeaseState, why: str, **fields: Any) -> None:
    LEASES.transition(tx, lease, target, why, **fields)


def close(tx: Tx, lease: LeaseRecord, why: CloseReason, detail: str) -> None:
    """End a live lease: closing while its work stops, closed once nothing of it runs
    (at once when nothing does). The first reason given stands."""
    if lease.state in TERMINAL or lease.state == L.CLOSING:
        return
    reason = lease.close_reason or why.value
    if _work_live(tx, lease):
        transition(tx, lease, L.CLOSING, detail, close_reason=reason)
    else:
        transition(tx, lease, L.CLOSED, detail, close_reason=reason, reason=detail[:2000])


def _write(
    tx: Tx, lease: LeaseRecord, target: LeaseState, reason: str, changes: dict[str, Any]
) -> None:
    tx.market.write_transition(lease, target, reason, changes)


def _work_live(tx: Tx, lease: LeaseRecord) -> bool:
    if lease.service_id:
        service = tx.services.get(lease.service_id)
        return service is not None and service.state != ServiceState.STOPPED
    if lease.task_id:
        task = tx.tasks.get(lease.task_id)
        return task is not None and task.state not in TASK_TERMINAL
    return False


# -- the rules ----------------------------------------------------------------------


def _stop_work(tx: Tx, lease: LeaseRecord, change: LeaseChange) -> None:
    why = f"lease {lease.id} closing: {change.reason}"
    if lease.service_id:
        service = tx.services.get(lease.service_id)
        if service is not None and service.state in SERVICE_ACTIVE:
            services.stop(tx, service, why)
    elif lease.task_id:
        task = tx.tasks.get(lease.task_id)
        if task is not None and task.state not in TASK_TERMINAL | {TaskState.CANCELLING}:
            tasks.request_cancel(tx, task, why)
    # stopping may have ended the work at once (it never started): then it is closed
    current = tx.market.get(lease.id)
    if current is not None and current.state == L.CLOSING and not _work_live(tx, current):
        transition(tx, current, L.CLOSED, "its work stopped", reason=change.reason[:2000])


def _stamp_end(tx: Tx, lease: LeaseRecord) -> dict[str, Any]:
    return {"ended_at": lease.ended_at or tx.now}


def _report(tx: Tx, lease: LeaseRecord, change: LeaseChange) -> None:
    tx.signal(Signal.LEASES, lease.id)


ANY = frozenset(L)
LEASE_RULES: list[LeaseRule] = [
    LeaseRule(
        "stop-work",
        "a closing lease stops its task or service; once nothing runs it is closed",
        frozenset({L.CLOSING}),
        then=_stop_work,
    ),
    LeaseRule(
        "stamp-end",
        "a closed lease says when its work ended (billing ends there)",
        frozenset({L.CLOSED}),
        changes=_stamp_end,
    ),
    LeaseRule(
        "report",
        "every change wakes the market's reporter, which tells the market",
        ANY,
        then=_report,
    ),
]
LEASES: Machine[Tx, LeaseRecord, LeaseState] = Machine(
    "lease",
    TRANSITIONS,
    write=_write,
    state_of=lambda lease: lease.state,
    subject_of=lambda lease: lease.id,
    rules=LEASE_RULES,
)


# -- what its work's transitions cause ----------------------------------------------


def ended_why(task: TaskRecord) -> CloseReason:
    """Why a lease closes when its job's task ended this way: whose fault it was."""
    if task.state == TaskState.SUCCEEDED:
        return CloseReason.COMPLETED
    if task.state == TaskState.CANCELLED:
        return CloseReason.PREEMPTED  # not the lease's close: this provider took it back
    kind = failure_kind(task.state_reason)
    if kind == "max_duration":
        return CloseReason.EXPIRED
    if kind in ("exit_code", "oom", "signal"):
        return CloseReason.WORK_FAILED
    return CloseReason.FAILED


def _work_ended(tx: Tx, lease: LeaseRecord, why: CloseReason, detail: str) -> None:
    if lease.state in TERMINAL:
        return
    if lease.state == L.CLOSING:
        transition(tx, lease, L.CLOSED, detail, reason=detail[:2000])
        return
    transition(
        tx, lease, L.CLOSED, detail, close_reason=lease.close_reason or why, reason=detail[:2000]
    )


def on_task(tx: Tx, task: TaskRecord, change: tasks.TaskChange) -> None:
    """The lease's job changed state (after its own rules: a retried task is queued)."""
    lease = tx.market.get(task.owner_id or "")
    if lease is None or lease.state in TERMINAL:
        return
    if task.state == TaskState.RUNNING and lease.state == L.PROVISIONING:
        transition(tx, lease, L.RUNNING, f"task {task.id} running")
    elif task.state in TASK_TERMINAL:
        detail = f"task {task.id} {task.state}: {task.state_reason}"
        _work_ended(tx, lease, ended_why(task), detail)


def on_service(tx: Tx, service: ServiceRecord, change: services.ServiceChange) -> None:
    """The lease's service changed state."""
    lease = tx.market.get(service.owner_id or "")
    if lease is None or lease.state in TERMINAL:
        return
    if change.target == ServiceState.LIVE and lease.state == L.PROVISIONING:
        transition(tx, lease, L.RUNNING, f"service {service.name} {change.reason}")
    elif change.target == ServiceState.STOPPED:
        detail = f"service {service.name} stopped: {change.reason}"
        _work_ended(tx, lease, CloseReason.PREEMPTED, detail)


tasks.OWNERS[OwnerKind.LEASE] = on_task
services.OWNERS[OwnerKind.LEASE] = on_service
