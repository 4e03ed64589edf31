"""The store: every read and write of persistent state, in short transactions."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from gpuprovider.domain.spec import TaskSpec
from gpuprovider.domain.states import TERMINAL, TaskState, check_transition
from gpuprovider.store import schema as t
from gpuprovider.store.records import (
    AllocationRecord,
    EventRecord,
    GpuRecord,
    NodeRecord,
    TaskRecord,
    TokenRecord,
)


class StoreError(RuntimeError):
    pass


class NameTaken(ValueError):
    def __init__(self, name: str, holder: str):
        super().__init__(
            f"a live task is already named {name!r} ({holder}); cancel it or choose another name"
        )


class StaleTask(RuntimeError):
    """The task changed since it was read; the caller re-reads and decides again."""


def _record(cls: type, row: Any) -> Any:
    mapping = row._mapping
    return cls(**{f.name: mapping[f.name] for f in fields(cls) if f.name in mapping})


# Tasks are read often: select their columns in the record's field order and
# build records positionally.
_TASK_COLUMNS = [t.tasks.c[f.name] for f in fields(TaskRecord)]
_SELECT_TASKS = select(*_TASK_COLUMNS)


def _task(row: Any) -> TaskRecord:
    task = TaskRecord(*row)
    task.state = TaskState(task.state)
    return task


# Constant statements: SQLAlchemy compiles each once and reuses it.
_INSERT_TASK = insert(t.tasks)
_INSERT_EVENT = insert(t.events)
_UPDATE_GUARDED = update(t.tasks).where(
    t.tasks.c.id == bindparam("b_id"), t.tasks.c.version == bindparam("b_version")
)


def new_task_id() -> str:
    return "t-" + secrets.token_hex(6)


class Tx:
    """One open transaction, with the one function that moves a task between states."""

    def __init__(self, conn: Connection, now: float):
        self.conn = conn
        self.now = now

    def transition(
        self, task: TaskRecord, target: TaskState, reason: str, **changes: Any
    ) -> TaskRecord:
        """Move `task` to `target`, checked against the table, with an event.

        Guarded by the task's version: if anything else changed the task since it
        was read, nothing is written and StaleTask is raised.
        """
        check_transition(task.state, target)
        values = dict(changes)
        values.update(
            state=target.value,
            state_reason=reason,
            updated_at=self.now,
            version=task.version + 1,
            live_name=None if target in TERMINAL else task.name,
        )
        if target in TERMINAL:
            values["finished_at"] = self.now
        result = self.conn.execute(
            _UPDATE_GUARDED, {**values, "b_id": task.id, "b_version": task.version}
        )
        if result.rowcount != 1:
            raise StaleTask(task.id)
        self.conn.execute(
            _INSERT_EVENT,
            {
                "task_id": task.id,
                "at": self.now,
                "from_state": task.state.value,
                "to_state": target.value,
                "reason": reason,
            },
        )
        for key, value in values.items():
            if hasattr(task, key):
                setattr(task, key, value)
        task.state = target
        return task

    def note(self, task: TaskRecord, reason: str) -> None:
        """Change the visible reason of a task without changing its state (no event)."""
        self.conn.execute(
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
        ports: dict[str, int],
        over_quota: bool = False,
    ) -> None:
        self.conn.execute(
            insert(t.allocations).values(
                task_id=task.id,
                attempt=task.attempt,
                node_id=node_id,
                gpu_uuids=list(gpu_uuids),
                gpu_milli=gpu_milli,
                cpu_milli=cpu_milli,
                memory_mib=memory_mib,
                ports=ports,
                over_quota=over_quota,
                active=True,
                created_at=self.now,
            )
        )

    def release(self, task_id: str) -> None:
        self.conn.execute(
            update(t.allocations)
            .where(t.allocations.c.task_id == task_id, t.allocations.c.active.is_(True))
            .values(active=False, released_at=self.now)
        )


class Store:
    def __init__(self, url: str):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        connect_args = {"check_same_thread": False} if self.is_sqlite else {}
        self.engine: Engine = create_engine(url, connect_args=connect_args)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)

    # -- schema --------------------------------------------------------------

    def create(self) -> None:
        t.metadata.create_all(self.engine)
        with self.engine.begin() as conn:
            version = conn.execute(select(t.meta.c.value).where(t.meta.c.key == "schema")).scalar()
            if version is None:
                conn.execute(insert(t.meta).values(key="schema", value=str(t.SCHEMA_VERSION)))

    def check_schema(self) -> None:
        try:
            with self.engine.connect() as conn:
                version = conn.execute(
                    select(t.meta.c.value).where(t.meta.c.key == "schema")
                ).scalar()
        except Exception as exc:
            raise StoreError(
                f"cannot read the store at {self.url}: {exc}; run `gpuprovider init`"
            ) from None
        if version is None:
            raise StoreError(f"the store at {self.url} is empty; run `gpuprovider init`")
        if int(version) > t.SCHEMA_VERSION:
            raise StoreError(
                f"the store was written by a newer gpuprovider (schema {version}, "
                f"this one knows {t.SCHEMA_VERSION}); upgrade gpuprovider"
            )
        t.metadata.create_all(self.engine)  # tables added since the store was made

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        with self.engine.begin() as conn:
            yield Tx(conn, time.time())

    def close(self) -> None:
        self.engine.dispose()

    # -- tokens --------------------------------------------------------------

    def add_token(self, name: str, token_hash: str, scopes: list[str], tenant: str) -> TokenRecord:
        record = TokenRecord(
            id="k-" + secrets.token_hex(6),
            name=name,
            scopes=scopes,
            tenant=tenant,
            created_at=time.time(),
        )
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(t.tokens).values(
                        id=record.id,
                        name=name,
                        token_hash=token_hash,
                        scopes=scopes,
                        tenant=tenant,
                        created_at=record.created_at,
                    )
                )
        except IntegrityError:
            raise ValueError(f"a token named {name!r} exists already") from None
        return record

    def token_by_hash(self, token_hash: str) -> TokenRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(t.tokens).where(t.tokens.c.token_hash == token_hash)).first()
        return _record(TokenRecord, row) if row else None

    def tokens(self) -> list[TokenRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(t.tokens).order_by(t.tokens.c.created_at)).all()
        return [_record(TokenRecord, r) for r in rows]

    def token_names(self) -> list[str]:
        return [tok.name for tok in self.tokens()]

    # -- nodes and GPUs ------------------------------------------------------

    def upsert_node(self, node: NodeRecord) -> None:
        """Record a node's latest inventory; GPUs gone from it stay listed as not present."""
        values = {f.name: getattr(node, f.name) for f in fields(NodeRecord) if f.name != "gpus"}
        with self.engine.begin() as conn:
            exists = conn.execute(select(t.nodes.c.id).where(t.nodes.c.id == node.id)).first()
            if exists:
                # Status is the operator's (cordon, drain); inventory does not reset it.
                values.pop("status")
                values.pop("status_reason")
                conn.execute(update(t.nodes).where(t.nodes.c.id == node.id).values(**values))
            else:
                conn.execute(insert(t.nodes).values(**values))
            known = {
                row.uuid: row
                for row in conn.execute(select(t.gpus).where(t.gpus.c.node_id == node.id))
            }
            for gpu in node.gpus:
                gpu_values = {
                    f.name: getattr(gpu, f.name)
                    for f in fields(GpuRecord)
                    if not f.name.startswith("proof_")
                }
                if gpu.uuid in known:
                    # Health set by checks is kept; inventory only refreshes facts.
                    gpu_values.pop("health")
                    gpu_values.pop("health_reason")
                    conn.execute(
                        update(t.gpus).where(t.gpus.c.uuid == gpu.uuid).values(**gpu_values)
                    )
                else:
                    conn.execute(insert(t.gpus).values(**gpu_values))
                    _apply_check_health(conn, gpu.uuid)  # checked before it was registered
            seen = {g.uuid for g in node.gpus}
            for uuid in set(known) - seen:
                conn.execute(update(t.gpus).where(t.gpus.c.uuid == uuid).values(present=False))

    def set_node_status(self, node_id: str, status: str, reason: str) -> bool:
        """Set a known node's status (ready, unreachable, ...); False if it is unknown."""
        with self.engine.begin() as conn:
            done = conn.execute(
                update(t.nodes)
                .where(t.nodes.c.id == node_id)
                .where((t.nodes.c.status != status) | (t.nodes.c.status_reason != reason))
                .values(status=status, status_reason=reason)
            )
        return done.rowcount > 0

    def remove_node(self, node_id: str) -> None:
        """Forget a node and its GPUs (its tasks' history stays)."""
        with self.engine.begin() as conn:
            conn.execute(t.gpus.delete().where(t.gpus.c.node_id == node_id))
            conn.execute(t.check_results.delete().where(t.check_results.c.node_id == node_id))
            conn.execute(t.nodes.delete().where(t.nodes.c.id == node_id))

    def nodes(self, ids: list[str] | None = None) -> list[NodeRecord]:
        """Every node with its GPUs, or only the nodes `ids`."""
        node_q = select(t.nodes).order_by(t.nodes.c.name)
        gpu_q = select(t.gpus).order_by(t.gpus.c.node_id, t.gpus.c.idx)
        proof_q = select(t.gpu_proofs)
        if ids is not None:
            node_q = node_q.where(t.nodes.c.id.in_(ids))
            gpu_q = gpu_q.where(t.gpus.c.node_id.in_(ids))
            proof_q = proof_q.where(t.gpu_proofs.c.node_id.in_(ids))
        with self.engine.connect() as conn:
            node_rows = conn.execute(node_q).all()
            gpu_rows = conn.execute(gpu_q).all()
            proofs = {row.gpu_uuid: row for row in conn.execute(proof_q)}
        by_node: dict[str, list[GpuRecord]] = {}
        for row in gpu_rows:
            gpu = _record(GpuRecord, row)
            if proof := proofs.get(gpu.uuid):
                gpu.proof_passed, gpu.proof_at, gpu.proof_reason = (
                    proof.passed,
                    proof.at,
                    proof.reason,
                )
            by_node.setdefault(row.node_id, []).append(gpu)
        result = []
        for row in node_rows:
            node = _record(NodeRecord, row)
            node.gpus = by_node.get(node.id, [])
            result.append(node)
        return result

    # -- proofs of GPU --------------------------------------------------------

    def save_proof(
        self,
        gpu_uuid: str,
        node_id: str,
        challenge_id: str,
        passed: bool,
        reason: str,
        figures: dict[str, Any],
        verifier: str,
        at: float,
    ) -> None:
        """Keep the latest verdict for a GPU."""
        with self.engine.begin() as conn:
            conn.execute(t.gpu_proofs.delete().where(t.gpu_proofs.c.gpu_uuid == gpu_uuid))
            conn.execute(
                insert(t.gpu_proofs).values(
                    gpu_uuid=gpu_uuid,
                    node_id=node_id,
                    challenge_id=challenge_id,
                    passed=passed,
                    reason=reason,
                    figures=figures,
                    verifier=verifier,
                    at=at,
                )
            )

    def proof(self, gpu_uuid: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(t.gpu_proofs).where(t.gpu_proofs.c.gpu_uuid == gpu_uuid)
            ).first()
        return dict(row._mapping) if row else None

    # -- check results -------------------------------------------------------

    def save_check_results(self, node_id: str, results: Sequence[Any], ran_at: float) -> None:
        """Keep each check's latest result; a GPU with any FAIL among its latest results
        is marked failed (no new work), and cleared once none is left."""
        with self.engine.begin() as conn:
            touched: set[str] = set()
            for result in results:
                row = result.to_dict() | {"node_id": node_id, "key": result.key, "ran_at": ran_at}
                conn.execute(
                    t.check_results.delete().where(
                        (t.check_results.c.node_id == node_id)
                        & (t.check_results.c.key == result.key)
                    )
                )
                conn.execute(insert(t.check_results).values(**row))
                if result.gpu_uuid:
                    touched.add(result.gpu_uuid)
            for uuid in touched:
                _apply_check_health(conn, uuid)

    def check_results(self, node_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t.check_results)
                .where(t.check_results.c.node_id == node_id)
                .order_by(t.check_results.c.ran_at, t.check_results.c.group, t.check_results.c.key)
            ).all()
        return [dict(row._mapping) for row in rows]

    # -- tasks ---------------------------------------------------------------

    def submit(self, spec: TaskSpec, tenant: str, now: float | None = None) -> TaskRecord:
        """Store a validated spec and queue it: one transaction, two events."""
        now = now or time.time()
        task_id = new_task_id()
        values = dict(
            id=task_id,
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
        )
        try:
            with self.engine.begin() as conn:
                conn.execute(_INSERT_TASK, values)
                conn.execute(
                    _INSERT_EVENT,
                    {
                        "task_id": task_id,
                        "at": now,
                        "from_state": None,
                        "to_state": TaskState.SUBMITTED.value,
                        "reason": f"submitted by {tenant}",
                    },
                )
                task = TaskRecord(**{k: v for k, v in values.items() if k != "live_name"})
                task.state = TaskState.SUBMITTED
                Tx(conn, now).transition(task, TaskState.QUEUED, "waiting for the scheduler")
        except IntegrityError:
            holder = self.task(spec.name or "")
            raise NameTaken(spec.name or "", holder.id if holder else "?") from None
        return task

    def task(self, ref: str) -> TaskRecord | None:
        """A task by id, else the live task of that name, else the newest of that name."""
        with self.engine.connect() as conn:
            row = conn.execute(
                _SELECT_TASKS.where(or_(t.tasks.c.id == ref, t.tasks.c.name == ref))
                .order_by(
                    (t.tasks.c.id == ref).desc(),
                    t.tasks.c.live_name.is_(None),
                    t.tasks.c.created_at.desc(),
                )
                .limit(1)
            ).first()
        return _task(row) if row else None

    def tasks(
        self,
        states: Sequence[TaskState] | None = None,
        ids: Iterable[str] | None = None,
        deadline_before: float | None = None,
        name: str | None = None,
        kind: str | None = None,
        tenant: str | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[TaskRecord]:
        query = _SELECT_TASKS
        if states:
            query = query.where(t.tasks.c.state.in_([s.value for s in states]))
        if deadline_before is not None:
            query = query.where(t.tasks.c.queue_deadline < deadline_before)
        if ids is not None:
            query = query.where(t.tasks.c.id.in_(list(ids)))
        if name:
            query = query.where(t.tasks.c.name == name)
        if kind:
            query = query.where(t.tasks.c.kind == kind)
        if tenant:
            query = query.where(t.tasks.c.tenant == tenant)
        order = t.tasks.c.created_at.desc() if newest_first else t.tasks.c.created_at
        query = query.order_by(order, t.tasks.c.id)
        if limit:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [_task(r) for r in conn.execute(query)]

    def queued_brief(self) -> dict[str, float]:
        """Every queued task's id and `not_before`, without decoding its spec."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t.tasks.c.id, t.tasks.c.not_before).where(
                    t.tasks.c.state == TaskState.QUEUED.value
                )
            )
            return dict(rows.all())

    def count_tasks(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t.tasks.c.state, func.count()).group_by(t.tasks.c.state)
            ).all()
        return {state: n for state, n in rows}

    def events(self, task_id: str) -> list[EventRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t.events).where(t.events.c.task_id == task_id).order_by(t.events.c.id)
            ).all()
        return [_record(EventRecord, r) for r in rows]

    def allocation(self, task_id: str) -> AllocationRecord | None:
        """The task's latest allocation, active or not."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(t.allocations)
                .where(t.allocations.c.task_id == task_id)
                .order_by(t.allocations.c.id.desc())
                .limit(1)
            ).first()
        return _record(AllocationRecord, row) if row else None

    def gang_members(self, gang: str) -> list[TaskRecord]:
        with self.engine.connect() as conn:
            return [_task(r) for r in conn.execute(_SELECT_TASKS.where(t.tasks.c.gang == gang))]

    def active_allocations(self) -> list[AllocationRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(t.allocations).where(t.allocations.c.active.is_(True)))
            return [_record(AllocationRecord, r) for r in rows]


def _apply_check_health(conn: Connection, uuid: str) -> None:
    """A GPU with a FAIL among its latest check results is `failed`; otherwise `ok`.
    Health set by anything else is left alone."""
    failed = conn.execute(
        select(t.check_results.c.key, t.check_results.c.advice)
        .where(t.check_results.c.gpu_uuid == uuid)
        .where(t.check_results.c.status == "FAIL")
        .order_by(t.check_results.c.key)
    ).all()
    reason = "; ".join(f"{r.key}: {r.advice}" if r.advice else r.key for r in failed)
    conn.execute(
        update(t.gpus)
        .where(t.gpus.c.uuid == uuid)
        .where(t.gpus.c.health.in_(("ok", "failed")))
        .values(
            health="failed" if failed else "ok",
            health_reason=f"last check FAILed: {reason}" if failed else "",
        )
    )


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
