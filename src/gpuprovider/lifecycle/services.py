"""A service's lifecycle: its state machine on the kernel, and what its replicas'
transitions cause for it (its owner hook).

A service is a named replica set. Its replicas are tasks it owns; every transition of
one reaches `on_replica` in the same transaction: the first replica running makes the
service live; a replica that ends is replaced while the service is active; the last
replica of a stopping service to end stops it. Scaling (by hand or by the autoscaler)
adds replicas or marks extras draining in the transaction that decides it. A service
owned by something (a lease) tells its owner of its own transitions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpuprovider.domain.records import OwnerKind, ServiceRecord, TaskRecord
from gpuprovider.domain.services import ACTIVE, SERVICE_TRANSITIONS, ServiceState
from gpuprovider.domain.states import TERMINAL, TaskState
from gpuprovider.lifecycle import tasks
from gpuprovider.lifecycle.kernel import Change, Machine, Rule
from gpuprovider.store.store import Tx

V = ServiceState
ServiceChange = Change[ServiceState]
ServiceRule = Rule[Tx, ServiceRecord, ServiceState]


def transition(tx: Tx, service: ServiceRecord, target: ServiceState, reason: str) -> None:
    SERVICES.transition(tx, service, target, reason)


def _write(
    tx: Tx, service: ServiceRecord, target: ServiceState, reason: str, changes: dict[str, Any]
) -> None:
    tx.services.write_transition(service, target, reason, changes)


# An owner's hook hears every transition of the services it owns, in the same transaction.
ServiceOwnerHook = Callable[[Tx, ServiceRecord, ServiceChange], None]
OWNERS: dict[OwnerKind, ServiceOwnerHook] = {}


# -- what people and the autoscaler do ----------------------------------------------


def add_replicas(tx: Tx, service: ServiceRecord, count: int, why: str) -> list[TaskRecord]:
    """`count` new replicas of `service`, queued, with a note saying why."""
    made = []
    for _ in range(count):
        number = service.next_replica + 1
        tx.services.update(service, next_replica=number)
        spec = service.task_spec.model_copy(update={"name": f"{service.name}.r{number}"})
        task = tx.tasks.insert(spec, service.tenant, owner=(OwnerKind.SERVICE, service.id))
        tasks.submit(tx, task)
        made.append(task)
    if made:
        tx.services.note(service, f"{why}: started {', '.join(t.label for t in made)}")
    return made


def serving(tx: Tx, service: ServiceRecord) -> list[TaskRecord]:
    """Its replicas that count towards its size: live, neither stopping nor drained."""
    return [
        t
        for t in tx.tasks.owned(OwnerKind.SERVICE, service.id, live=True)
        if t.id not in service.draining and t.state != TaskState.CANCELLING
    ]


def converge(tx: Tx, service: ServiceRecord, why: str) -> None:
    """Bring an active service to its wanted size: add replicas when fewer serve, mark
    the newest extras draining when more do."""
    if service.state not in ACTIVE:
        return
    now = serving(tx, service)
    if len(now) < service.replicas:
        add_replicas(tx, service, service.replicas - len(now), why)
    elif len(now) > service.replicas:
        extras = sorted(now, key=lambda t: t.created_at)[service.replicas :]
        draining = dict(service.draining) | {t.id: tx.now for t in extras}
        tx.services.update(service, draining=draining)
        names = ", ".join(t.label for t in extras)
        tx.services.note(service, f"draining {names}: {service.replicas} replicas wanted")


def scale(tx: Tx, service: ServiceRecord, replicas: int, why: str) -> None:
    """Set the wanted size (a note saying `why`), and add or drain replicas to reach it."""
    tx.services.update(service, replicas=replicas)
    tx.services.note(service, why)
    converge(tx, service, f"{replicas} replicas wanted")


def drained(tx: Tx, service: ServiceRecord, task_id: str, why: str) -> None:
    """A replica being drained has served what it had: stop it."""
    task = tx.tasks.get(task_id)
    if task is not None and task.state not in TERMINAL and task.state != TaskState.CANCELLING:
        tasks.request_cancel(tx, task, f"service {service.name} scaling down ({why})")


def stop(tx: Tx, service: ServiceRecord, by: str) -> None:
    transition(tx, service, V.STOPPING, f"stopped by {by}")


# -- the rules ----------------------------------------------------------------------


def _stop_replicas(tx: Tx, service: ServiceRecord, change: ServiceChange) -> None:
    for task in tx.tasks.owned(OwnerKind.SERVICE, service.id, live=True):
        current = tx.tasks.get(task.id)  # stopping one may have ended another
        if current and current.state not in TERMINAL and current.state != TaskState.CANCELLING:
            tasks.request_cancel(tx, current, f"service {service.name} {change.reason}")
    _stop_when_idle(tx, service.id)


def _stop_when_idle(tx: Tx, service_id: str) -> None:
    current = tx.services.get(service_id)
    if (
        current is not None
        and current.state == V.STOPPING
        and not tx.tasks.owned(OwnerKind.SERVICE, service_id, live=True)
    ):
        transition(tx, current, V.STOPPED, "its last replica ended")


def _tell_owner(tx: Tx, service: ServiceRecord, change: ServiceChange) -> None:
    if service.owner_kind is None:
        return
    hook = OWNERS.get(OwnerKind(service.owner_kind))
    if hook is None:  # a feature's hook not loaded: never skip an owner quietly
        raise RuntimeError(f"no owner hook for {service.owner_kind} (service {service.id})")
    hook(tx, service, change)


SERVICE_RULES: list[ServiceRule] = [
    ServiceRule(
        "stop-replicas",
        "a stopping service stops its replicas; with none left it is stopped at once",
        frozenset({V.STOPPING}),
        then=_stop_replicas,
    ),
    ServiceRule(
        "tell-owner",
        "the service's owner (its lease) hears of every transition",
        frozenset(V),
        then=_tell_owner,
    ),
]
SERVICES: Machine[Tx, ServiceRecord, ServiceState] = Machine(
    "service",
    SERVICE_TRANSITIONS,
    write=_write,
    state_of=lambda service: service.state,
    subject_of=lambda service: service.id,
    rules=SERVICE_RULES,
)


# -- what its replicas' transitions cause -------------------------------------------


def on_replica(tx: Tx, task: TaskRecord, change: tasks.TaskChange) -> None:
    """A replica changed state (after its own rules: a restarting replica is queued)."""
    service = tx.services.get(task.owner_id or "")
    if service is None:
        return
    if task.state == TaskState.RUNNING and service.state == V.STARTING:
        transition(tx, service, V.LIVE, f"replica {task.label} running")
    elif task.state in TERMINAL:
        if task.id in service.draining:
            draining = {k: v for k, v in service.draining.items() if k != task.id}
            tx.services.update(service, draining=draining)
        if service.state in ACTIVE:
            converge(tx, service, f"replica {task.label} {task.state}")
        else:
            _stop_when_idle(tx, service.id)


tasks.OWNERS[OwnerKind.SERVICE] = on_replica
