"""Gangs: the tasks of one distributed job, which end together."""

from __future__ import annotations

from gpuprovider.domain.states import TERMINAL, TaskState
from gpuprovider.store.records import TaskRecord
from gpuprovider.store.store import Store, Tx

S = TaskState

# Live states in which the executor stops a task's process.
STOPPING = frozenset({S.CANCELLING, S.PREEMPTED})


def release_gang(store: Store, tx: Tx, task: TaskRecord, why: str, restart: bool = False) -> None:
    """A gang lives and ends together. When a member fails or is cancelled, running
    members are stopped: preempted to run again if the gang restarts (`restart`),
    else cancelled; members not yet running are cancelled unless it restarts."""
    if not task.gang:
        return
    for sibling in store.gang_members(task.gang):
        if sibling.id == task.id or sibling.state in TERMINAL or sibling.state in STOPPING:
            continue
        if sibling.state == S.RUNNING:
            tx.transition(sibling, S.PREEMPTED if restart else S.CANCELLING, why)
        elif not restart and sibling.pid is None:
            tx.transition(sibling, S.CANCELLING, why)
            tx.release(sibling.id)
            tx.transition(sibling, S.CANCELLED, why)
