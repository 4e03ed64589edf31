"""A rental's lifecycle: its state machine on the kernel, and what its environment's
task transitions cause for it (its owner hook).

A rental's environment is one task it owns at a time (never preemptible, of the
rentals' priority, so the owner's preemptible work gives way to it). Every transition
of that task reaches `on_task` in the same transaction: running makes the rental
running (the time from request to running recorded); a restart (preempted, re-queued)
makes it provisioning again; an end makes it stopped, evicted or expired, as the
rental's state and its time say. No loop watches rentals.
"""

from __future__ import annotations

from typing import Any

from gpuprovider.domain.records import OwnerKind, TaskRecord
from gpuprovider.domain.rentals import ACTIVE, RENTAL_TRANSITIONS, RentalRecord, RentalState
from gpuprovider.domain.spec import PortSpec, Resources, RetryPolicy, TaskSpec
from gpuprovider.domain.states import TERMINAL, TaskState
from gpuprovider.lifecycle import tasks
from gpuprovider.lifecycle.kernel import Change, Machine, Refused, Rule
from gpuprovider.store.signals import Signal
from gpuprovider.store.store import Tx

R = RentalState
RentalChange = Change[RentalState]
RentalRule = Rule[Tx, RentalRecord, RentalState]

# Inside every rental's container: the tenant's disk, and the read-only home holding
# the keys the SSH server accepts. The SSH server's host key is mounted beside it.
DISK_MOUNT = "/data"
HOME_ROOT = "/home"
HOST_KEY_MOUNT = "/etc/gpuprovider/ssh_host_key"
SSH_SERVER = "/usr/sbin/dropbear"
# A rental whose environment ends this close to its end time has expired.
EXPIRY_SLACK_S = 2.0


def transition(tx: Tx, rental: RentalRecord, target: RentalState, reason: str) -> None:
    RENTALS.transition(tx, rental, target, reason)


def _write(
    tx: Tx, rental: RentalRecord, target: RentalState, reason: str, changes: dict[str, Any]
) -> None:
    tx.rentals.write_transition(rental, target, reason, changes)


def ssh_command(rental: RentalRecord) -> list[str]:
    """The SSH server the environment runs, as the container's command: in the
    foreground, logging to its output, keys only, no root, on the rental's port; its
    sessions get the environment's variables (the GPUs it holds, its ports)."""
    return [
        SSH_SERVER,
        "-F",
        "-E",
        "-e",
        "-s",
        "-w",
        "-p",
        str(rental.ssh_port),
        "-r",
        HOST_KEY_MOUNT,
        "-P",
        "/tmp/dropbear.pid",
    ]


def environment_spec(rental: RentalRecord, now: float, priority: int) -> TaskSpec:
    """The task that runs `rental`'s environment now: its image running the SSH server,
    its resources, its ports (the SSH port first), its time left."""
    spec = rental.rental_spec
    left = rental.expires_at - now if rental.expires_at is not None else None
    return TaskSpec(
        kind="job",
        image=spec.image,
        command=ssh_command(rental),
        resources=Resources(gpu=spec.gpu, cpu=spec.cpu, memory_mib=spec.memory_mib),
        ports=[PortSpec(name="ssh"), *(PortSpec(name=p.name) for p in spec.ports)],
        max_duration_s=max(left, 1.0) if left is not None else None,
        retry=RetryPolicy(attempts=1),
        priority=priority,
        preemptible=False,
        labels={"rental": rental.name},
    )


# -- what tenants and the owner do --------------------------------------------------


def start_environment(tx: Tx, rental: RentalRecord, priority: int) -> TaskRecord:
    """A new task for `rental`'s environment, queued; the rental remembers it."""
    if rental.expires_at is not None and rental.expires_at - tx.now < EXPIRY_SLACK_S:
        raise Refused(f"rental {rental.name} has no time left; extend it first")
    task = tx.tasks.insert(
        environment_spec(rental, tx.now, priority),
        rental.tenant,
        owner=(OwnerKind.RENTAL, rental.id),
    )
    tx.rentals.update(
        rental, task_id=task.id, starts=rental.starts + 1, requested_at=tx.now, ready_s=None
    )
    tasks.submit(tx, task)
    return task


def start(tx: Tx, rental: RentalRecord, by: str, priority: int) -> None:
    """Start a rental at rest again, on the same disk and ports."""
    transition(tx, rental, R.PROVISIONING, f"started by {by}")
    start_environment(tx, rental, priority)


def stop(tx: Tx, rental: RentalRecord, by: str) -> None:
    transition(tx, rental, R.STOPPING, f"stopped by {by}")


def evict(tx: Tx, rental: RentalRecord, why: str) -> None:
    transition(tx, rental, R.EVICTING, f"evicted by the owner: {why}")


def delete(tx: Tx, rental: RentalRecord, by: str) -> None:
    transition(tx, rental, R.DELETED, f"deleted by {by}; its disk is wiped")


# -- the rules ----------------------------------------------------------------------


def _live_task(tx: Tx, rental: RentalRecord) -> TaskRecord | None:
    task = tx.tasks.get(rental.task_id) if rental.task_id else None
    return task if task is not None and task.state not in TERMINAL else None


def _stop_environment(tx: Tx, rental: RentalRecord, change: RentalChange) -> None:
    task = _live_task(tx, rental)
    if task is None:
        transition(
            tx,
            rental,
            R.EVICTED if rental.state == R.EVICTING else R.STOPPED,
            "nothing was running",
        )
    elif task.state != TaskState.CANCELLING:
        tasks.request_cancel(tx, task, f"rental {rental.name} {change.reason}")


def _ready(tx: Tx, rental: RentalRecord) -> dict[str, Any]:
    return {"ready_s": round(tx.now - rental.requested_at, 3)}


def _node_rented(tx: Tx, rental: RentalRecord, change: RentalChange) -> None:
    """A node is renting while a rental runs on it, empty otherwise (DBC's rental
    status): each change is a note in the node's journal and a RENTED signal (the
    daemon broadcasts it where asked)."""
    if R.RUNNING not in (change.source, change.target) or not rental.node_id:
        return
    others = any(
        r.state == R.RUNNING and r.node_id == rental.node_id and r.id != rental.id
        for r in tx.rentals.list()
    )
    before, now = others or change.source == R.RUNNING, others or change.target == R.RUNNING
    if before == now:
        return
    node = tx.nodes.get(rental.node_id)
    status = node.status.value if node is not None else "ready"
    status_now = "renting" if now else "empty"
    why = f"{status_now}: rental {rental.name} {change.target}"
    tx.journal.write("node", rental.node_id, "", status, status, why)
    tx.signal(Signal.RENTED, f"{rental.node_id}={status_now}")


def _not_running(tx: Tx, rental: RentalRecord, change: RentalChange) -> None:
    if _live_task(tx, rental) is not None:
        raise Refused(f"rental {rental.name} still runs; stop it first")


RENTAL_RULES: list[RentalRule] = [
    RentalRule(
        "stop-environment",
        "a stopping or evicted rental stops its environment; with none it is at rest at once",
        frozenset({R.STOPPING, R.EVICTING}),
        then=_stop_environment,
    ),
    RentalRule(
        "time-to-ready",
        "a rental running for the first time since its start records request -> running",
        frozenset({R.RUNNING}),
        frozenset({R.PROVISIONING}),
        changes=_ready,
    ),
    RentalRule(
        "node-rented",
        "a node with a rental running is renting, else empty: a node note and a signal",
        frozenset(R),
        then=_node_rented,
    ),
    RentalRule(
        "delete-at-rest",
        "a rental is deleted only once nothing of it runs",
        frozenset({R.DELETED}),
        guard=_not_running,
    ),
]
RENTALS: Machine[Tx, RentalRecord, RentalState] = Machine(
    "rental",
    RENTAL_TRANSITIONS,
    write=_write,
    state_of=lambda rental: rental.state,
    subject_of=lambda rental: rental.id,
    rules=RENTAL_RULES,
)


# -- what its environment's transitions cause ---------------------------------------


def on_task(tx: Tx, task: TaskRecord, change: tasks.TaskChange) -> None:
    """The rental's environment changed state (after the task's own rules)."""
    rental = tx.rentals.get(task.owner_id or "")
    if rental is None or rental.task_id != task.id:
        return  # an environment it no longer counts on
    if task.state == TaskState.RUNNING:
        if rental.state == R.PROVISIONING:
            tx.rentals.update(rental, node_id=task.node_id)
            transition(tx, rental, R.RUNNING, f"its environment runs on node {task.node_id}")
    elif task.state in (TaskState.QUEUED, TaskState.PREEMPTED):
        if rental.state == R.RUNNING:
            transition(tx, rental, R.PROVISIONING, f"its environment restarts: {change.reason}")
    elif task.state in TERMINAL:
        why = task.state_reason or str(task.state)
        if rental.state == R.EVICTING:
            transition(tx, rental, R.EVICTED, f"its environment stopped ({why})")
        elif rental.expires_at is not None and tx.now >= rental.expires_at - EXPIRY_SLACK_S:
            transition(tx, rental, R.EXPIRED, "its time ran out; its disk is kept")
        elif rental.state == R.STOPPING:
            transition(tx, rental, R.STOPPED, "stopped; its disk is kept")
        elif rental.state in ACTIVE:
            transition(tx, rental, R.STOPPED, f"its environment ended: {why}")


tasks.OWNERS[OwnerKind.RENTAL] = on_task
