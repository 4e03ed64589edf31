"""Tasks with their allocations and events."""

from __future__ import annotations

import functools
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, bindparam, func, insert, or_, select, update

from gpuprovider.domain.records import SPECS, AllocationRecord, JournalRow, OwnerKind, TaskRecord
from gpuprovider.domain.spec import TaskSpec
from gpuprovider.domain.states import TERMINAL, TaskState
from gpuprovider.lifecycle.kernel import Stale
from gpuprovider.store import schema as t
from gpuprovider.store.rows import record

if TYPE_CHECKING:
    from gpuprovider.store.store import Tx


# Tasks are read often: select their columns in the record's field order and build
# records positionally. Statements are constants, so SQLAlchemy compiles each once.
_SELECT_TASKS = select(*[t.tasks.c[f.name] for f in fields(TaskRecord)])
_INSERT_TASK = insert(t.tasks)
_INSERT_ALLOCATION = insert(t.allocations)
_UPDATE_GUARDED = update(t.tasks).where(
    t.tasks.c.id == bindparam("b_id"), t.tasks.c.version == bindparam("b_version")
)
_GET = _SELECT_TASKS.where(t.tasks.c.id == bindparam("id"))
_RESOLVE = (
    _SELECT_TASKS.where(
        or_(
            t.tasks.c.id == bindparam("ref"),
            and_(t.tasks.c.name == bindparam("ref"), t.tasks.c.tenant == bindparam("tenant")),
        )
    )
    .order_by(
        (t.tasks.c.id == bindparam("ref")).desc(),
        t.tasks.c.live_name.is_(None),
        t.tasks.c.created_at.desc(),
    )
    .limit(1)
)
_LIVE_NAMED = _SELECT_TASKS.where(
    t.tasks.c.tenant == bindparam("tenant"), t.tasks.c.live_name == bindparam("name")
)
_IDEMPOTENT = _SELECT_TASKS.where(
    t.tasks.c.tenant == bindparam("tenant"), t.tasks.c.idempotency_key == bindparam("key")
)
_SELECT_BY_IDS = _SELECT_TASKS.where(t.tasks.c.id.in_(bindparam("ids", expanding=True)))
_SELECT_BY_IDS_IN_STATE = _SELECT_BY_IDS.where(t.tasks.c.state == bindparam("state"))
_SELECT_ACTIVE = select(t.allocations).where(t.allocations.c.active.is_(True))
_SELECT_ACTIVE_OF = _SELECT_ACTIVE.where(
    t.allocations.c.task_id.in_(bindparam("ids", expanding=True))
)
_FINISHED_BETWEEN = _SELECT_TASKS.where(
    t.tasks.c.finished_at > bindparam("after"),
    t.tasks.c.finished_at <= bindparam("upto"),
    t.tasks.c.run_dir.is_not(None),
).order_by(t.tasks.c.finished_at)
_COUNT_BY_STATE = select(t.tasks.c.state, func.count()).group_by(t.tasks.c.state)
_COUNT_BY_STATE_OF = _COUNT_BY_STATE.where(t.tasks.c.tenant == bindparam("tenant"))
_QUEUED_BRIEF = select(t.tasks.c.id, t.tasks.c.not_before, t.tasks.c.version).where(
    t.tasks.c.state == TaskState.QUEUED.value
)
_RELEASE = (
    update(t.allocations)
    .where(t.allocations.c.task_id == bindparam("b_task"), t.allocations.c.active.is_(True))
    .values(active=False, released_at=bindparam("b_at"))
)


def _task(row: Any) -> TaskRecord:
    task = TaskRecord(*row)
    task.state = TaskState(task.state)
    return task


_FILTERS = {
    "states": t.tasks.c.state.in_(bindparam("states", expanding=True)),
    "ids": t.tasks.c.id.in_(bindparam("ids", expanding=True)),
    "deadline": t.tasks.c.queue_deadline < bindparam("deadline"),
    "name": t.tasks.c.name == bindparam("name"),
    "kind": t.tasks.c.kind == bindparam("kind"),
    "tenant": t.tasks.c.tenant == bindparam("tenant"),
    "node_id": t.tasks.c.node_id == bindparam("node_id"),
    # keyset paging, newest first: the tasks after (older than) one already shown
    "before": or_(
        t.tasks.c.created_at < bindparam("before_at"),
        and_(t.tasks.c.created_at == bindparam("before_at"), t.tasks.c.id > bindparam("before_id")),
    ),
}


@functools.cache
def _find_statement(given: tuple[str, ...], newest_first: bool) -> Any:
    """One constant statement per combination of filters, so that SQLAlchemy compiles
    each once (building a statement per call costs more than running it)."""
    query = _SELECT_TASKS.where(*(_FILTERS[key] for key in given if key != "limit"))
    order = t.tasks.c.created_at.desc() if newest_first else t.tasks.c.created_at
    query = query.order_by(order, t.tasks.c.id)
    return query.limit(bindparam("limit")) if "limit" in given else query


def new_task_id() -> str:
    return "t-" + secrets.token_hex(6)


class TaskRepo:
    def __init__(self, tx: Tx):
        self.tx = tx

    # -- writes (the lifecycle's: it checks each change against the state table) ----

    def insert(
        self,
        spec: TaskSpec,
        tenant: str,
        idempotency_key: str | None = None,
        owner: tuple[OwnerKind, str] | None = None,
    ) -> TaskRecord:
        """Store a validated spec as `submitted`, with its journal row. IntegrityError
        when a live task of the tenant has the name, or a task of the tenant has the key.
        `owner`: what the task belongs to (its service, its lease)."""
        now = self.tx.now
        values: dict[str, Any] = dict(
            id=new_task_id(),
            name=spec.name,
            live_name=spec.name,
            tenant=tenant,
            kind=spec.kind,
            state=TaskState.SUBMITTED.value,
            state_reason="",
            spec=spec.model_dump(mode="json", exclude_defaults=True),
            priority=spec.priority,
            attempt=0,
            preemptions=0,
            gang=f"{tenant}/{spec.gang.name}" if spec.gang else None,
            not_before=0.0,
            queue_deadline=now + spec.max_queue_s if spec.max_queue_s else None,
            exit_code=None,
            node_id=None,
            pid=None,
            pid_start_time=None,
            run_dir=None,
            started_at=None,
            finished_at=None,
            created_at=now,
            updated_at=now,
            version=0,
            crash_streak=0,
            idempotency_key=idempotency_key,
            owner_kind=owner[0].value if owner else None,
            owner_id=owner[1] if owner else None,
        )
        self.tx.conn.execute(_INSERT_TASK, values)
        self.tx.journal.write(
            "task", values["id"], tenant, None, TaskState.SUBMITTED.value, f"submitted by {tenant}"
        )
        values.pop("live_name")
        values.pop("idempotency_key")
        SPECS.put(values["id"], spec)
        task = TaskRecord(**values)
        task.state = TaskState.SUBMITTED
        return task

    def write_transition(
        self, task: TaskRecord, target: TaskState, reason: str, changes: dict[str, Any]
    ) -> None:
        """Store a state change, guarded by the task's version, and its journal row;
        update `task` to match. Stale when anything else changed the task since it was
        read."""
        values = dict(changes)
        values.update(
            state=target.value,
            state_reason=reason,
            updated_at=self.tx.now,
            version=task.version + 1,
            live_name=None if target in TERMINAL else task.name,
        )
        if target in TERMINAL:
            values["finished_at"] = self.tx.now
        done = self.tx.conn.execute(
            _UPDATE_GUARDED, {**values, "b_id": task.id, "b_version": task.version}
        )
        if done.rowcount != 1:
            raise Stale("task", task.id)
        self.tx.journal.write("task", task.id, task.tenant, task.state.value, target.value, reason)
        for key, value in values.items():
            if hasattr(task, key):
                setattr(task, key, value)
        task.state = target

    def write_fields(self, task: TaskRecord, **fields: Any) -> None:
        """Change fields of a task without changing its state (no event), guarded by
        its version like a transition."""
        values = {**fields, "updated_at": self.tx.now, "version": task.version + 1}
        done = self.tx.conn.execute(
            _UPDATE_GUARDED, {**values, "b_id": task.id, "b_version": task.version}
        )
        if done.rowcount != 1:
            raise Stale("task", task.id)
        for key, value in values.items():
            setattr(task, key, value)

    def note(self, task: TaskRecord, reason: str) -> None:
        """Change the visible reason of a task without changing its state (no event)."""
        self.tx.conn.execute(
            _UPDATE_GUARDED, {"state_reason": reason, "b_id": task.id, "b_version": task.version}
        )
        task.state_reason = reason

    def allocate(
        self,
        task: TaskRecord,
        node_id: str,
        gpu_uuids: Sequence[str],
        gpu_milli: int,
        cpu_milli: int,
        memory_mib: int,
        over_quota: bool = False,
    ) -> None:
        self.tx.conn.execute(
            _INSERT_ALLOCATION,
            {
                "task_id": task.id,
                "attempt": task.attempt,
                "node_id": node_id,
                "gpu_uuids": list(gpu_uuids),
                "gpu_milli": gpu_milli,
                "cpu_milli": cpu_milli,
                "memory_mib": memory_mib,
                "ports": {},
                "over_quota": over_quota,
                "active": True,
                "created_at": self.tx.now,
            },
        )

    def set_ports(self, task_id: str, ports: dict[str, int]) -> None:
        """The ports the node chose for the task's active allocation."""
        self.tx.conn.execute(
            update(t.allocations)
            .where(t.allocations.c.task_id == task_id, t.allocations.c.active.is_(True))
            .values(ports=ports)
        )

    def release(self, task_id: str) -> bool:
        """End the task's active allocation; False when it had none."""
        done = self.tx.conn.execute(_RELEASE, {"b_task": task_id, "b_at": self.tx.now})
        return done.rowcount > 0

    # -- reads ---------------------------------------------------------------------

    def get(self, task_id: str) -> TaskRecord | None:
        row = self.tx.conn.execute(_GET, {"id": task_id}).first()
        return _task(row) if row else None

    def resolve(self, ref: str, tenant: str) -> TaskRecord | None:
        """A task by id (any tenant's: the caller checks), else the tenant's live task of
        that name, else the tenant's newest of that name."""
        row = self.tx.conn.execute(_RESOLVE, {"ref": ref, "tenant": tenant}).first()
        return _task(row) if row else None

    def live_named(self, tenant: str, name: str) -> TaskRecord | None:
        row = self.tx.conn.execute(_LIVE_NAMED, {"tenant": tenant, "name": name}).first()
        return _task(row) if row else None

    def submitted_with(self, tenant: str, idempotency_key: str) -> TaskRecord | None:
        """The tenant's task submitted with this Idempotency-Key, if any."""
        row = self.tx.conn.execute(_IDEMPOTENT, {"tenant": tenant, "key": idempotency_key}).first()
        return _task(row) if row else None

    def find(
        self,
        states: Sequence[TaskState] | None = None,
        ids: Iterable[str] | None = None,
        deadline_before: float | None = None,
        name: str | None = None,
        kind: str | None = None,
        tenant: str | None = None,
        node_id: str | None = None,
        limit: int | None = None,
        newest_first: bool = False,
        before: tuple[float, str] | None = None,
    ) -> list[TaskRecord]:
        """Tasks matching every filter given, oldest first (or newest first); `before`
        (created_at, id): those after that task in newest-first order."""
        values: dict[str, Any] = {
            "states": [s.value for s in states] if states else None,
            "ids": list(ids) if ids is not None else None,
            "deadline": deadline_before,
            "name": name or None,
            "kind": kind or None,
            "tenant": tenant or None,
            "node_id": node_id or None,
            "limit": limit or None,
            "before": before,
        }
        given = tuple(key for key, value in values.items() if value is not None)
        query = _find_statement(given, newest_first)
        bound = {key: values[key] for key in given if key != "before"}
        if before is not None:
            bound["before_at"], bound["before_id"] = before
        return [_task(r) for r in self.tx.conn.execute(query, bound)]

    def by_ids(self, ids: Iterable[str], state: TaskState | None = None) -> list[TaskRecord]:
        """The tasks `ids` (those in `state` only, if given), in no set order."""
        wanted = list(ids)
        if not wanted:
            return []
        if state is None:
            rows = self.tx.conn.execute(_SELECT_BY_IDS, {"ids": wanted})
        else:
            rows = self.tx.conn.execute(_SELECT_BY_IDS_IN_STATE, {"ids": wanted, "state": state})
        return [_task(r) for r in rows]

    def finished_between(self, after: float, upto: float) -> list[TaskRecord]:
        """Tasks that ran and ended after `after`, up to `upto`, oldest first."""
        rows = self.tx.conn.execute(_FINISHED_BETWEEN, {"after": after, "upto": upto})
        return [_task(r) for r in rows]

    def queued_brief(self) -> dict[str, tuple[float, int]]:
        """Every queued task's id, `not_before` and version, without decoding its spec."""
        return {row[0]: (row[1], row[2]) for row in self.tx.conn.execute(_QUEUED_BRIEF)}

    def count_by_state(self, tenant: str | None = None) -> dict[str, int]:
        """Tasks by state: every tenant's, or one tenant's."""
        if tenant is None:
            return {state: n for state, n in self.tx.conn.execute(_COUNT_BY_STATE)}
        rows = self.tx.conn.execute(_COUNT_BY_STATE_OF, {"tenant": tenant})
        return {state: n for state, n in rows}

    def transitions(self) -> dict[str, int]:
        """Every task transition ever made, by the state it entered."""
        return self.tx.journal.counts("task")

    def failure_reasons(self) -> dict[str, int]:
        """How many times tasks failed, by reason as written."""
        return self.tx.journal.reasons("task", TaskState.FAILED.value)

    def replicas(self, service_ids: Iterable[str]) -> dict[str, list[TaskRecord]]:
        """The live replica tasks of each service, oldest first, in one query."""
        wanted = list(service_ids)
        found: dict[str, list[TaskRecord]] = {service_id: [] for service_id in wanted}
        if not wanted:
            return found
        query = (
            _SELECT_TASKS.where(
                t.tasks.c.owner_id.in_(wanted), t.tasks.c.owner_kind == OwnerKind.SERVICE.value
            )
            .where(t.tasks.c.state.not_in([s.value for s in TERMINAL]))
            .order_by(t.tasks.c.created_at)
        )
        for row in self.tx.conn.execute(query):
            task = _task(row)
            assert task.service_id is not None  # its owner is a service
            found[task.service_id].append(task)
        return found

    def events(self, task_id: str) -> list[JournalRow]:
        return self.tx.journal.of("task", task_id)

    def owned(self, kind: OwnerKind, owner_id: str, live: bool = False) -> list[TaskRecord]:
        """The tasks of one owner (only those not ended, with `live`), oldest first."""
        query = _SELECT_TASKS.where(
            t.tasks.c.owner_id == owner_id, t.tasks.c.owner_kind == kind.value
        )
        if live:
            query = query.where(t.tasks.c.state.not_in([s.value for s in TERMINAL]))
        return [_task(r) for r in self.tx.conn.execute(query.order_by(t.tasks.c.created_at))]

    def allocation(self, task_id: str) -> AllocationRecord | None:
        """The task's latest allocation, active or not."""
        row = self.tx.conn.execute(
            select(t.allocations)
            .where(t.allocations.c.task_id == task_id)
            .order_by(t.allocations.c.id.desc())
            .limit(1)
        ).first()
        return record(AllocationRecord, row) if row else None

    def gang_members(self, gang: str) -> list[TaskRecord]:
        return [_task(r) for r in self.tx.conn.execute(_SELECT_TASKS.where(t.tasks.c.gang == gang))]

    def active_allocations_of(self, task_ids: Iterable[str]) -> list[AllocationRecord]:
        wanted = list(task_ids)
        if not wanted:
            return []
        rows = self.tx.conn.execute(_SELECT_ACTIVE_OF, {"ids": wanted})
        return [record(AllocationRecord, r) for r in rows]

    def active_allocations(self) -> list[AllocationRecord]:
        return [record(AllocationRecord, r) for r in self.tx.conn.execute(_SELECT_ACTIVE)]
