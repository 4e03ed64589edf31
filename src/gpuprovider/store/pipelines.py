"""Pipelines and their stages. Writes of state go through the lifecycle (guarded by
each record's version, with a journal row)."""

from __future__ import annotations

import builtins
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, func, insert, select, update

from gpuprovider.domain.records import JournalRow
from gpuprovider.lifecycle.kernel import Stale
from gpuprovider.pipelines.model import (
    PIPELINE_LIVE,
    PipelineRecord,
    PipelineState,
    StageRecord,
    StageState,
)
from gpuprovider.store import schema as t

if TYPE_CHECKING:
    from gpuprovider.store.store import Tx

_P = [t.pipelines.c[f.name] for f in fields(PipelineRecord)]
_S = [t.pipeline_stages.c[f.name] for f in fields(StageRecord)]
_SC = t.pipeline_stages.c
# Read on every transition of a stage's task: constant statements, compiled once.
_GET = select(*_P).where(t.pipelines.c.id == bindparam("id"))
_STAGE = select(*_S).where(_SC.id == bindparam("id"))
_STAGES = select(*_S).where(_SC.pipeline_id == bindparam("id")).order_by(_SC.depth, _SC.name)
_OF_TASK = select(*_S).where(_SC.task_id == bindparam("id")).order_by(_SC.id)
_HOLDING = select(func.count(func.distinct(_SC.task_id))).where(
    _SC.tenant == bindparam("tenant"),
    _SC.pool == bindparam("pool"),
    _SC.state == StageState.RUNNING.value,
)
# Guarded by the version read; the columns set are the parameters given.
_UPDATE_PIPELINE = update(t.pipelines).where(
    t.pipelines.c.id == bindparam("b_id"), t.pipelines.c.version == bindparam("b_version")
)
_UPDATE_STAGE = update(t.pipeline_stages).where(
    _SC.id == bindparam("b_id"), _SC.version == bindparam("b_version")
)
# A pool's ready stages whose pipeline runs, in the order they get a slot.
_READY_TO_RUN = (
    select(*_S)
    .join(t.pipelines, t.pipelines.c.id == _SC.pipeline_id)
    .where(
        _SC.tenant == bindparam("tenant"),
        _SC.pool == bindparam("pool"),
        _SC.state == StageState.READY.value,
        t.pipelines.c.state == PipelineState.RUNNING.value,
    )
    .order_by(_SC.depth.desc(), _SC.updated_at, _SC.id)
)


def _pipeline(row: Any) -> PipelineRecord:
    found = PipelineRecord(*row)  # the columns are selected in the fields' order
    found.state = PipelineState(found.state)
    return found


def _stage(row: Any) -> StageRecord:
    found = StageRecord(*row)
    found.state = StageState(found.state)
    return found


def new_pipeline_id() -> str:
    return "p-" + secrets.token_hex(6)


class PipelineRepo:
    def __init__(self, tx: Tx):
        self.tx = tx

    # -- writes -------------------------------------------------------------------

    def insert(
        self,
        pipeline_id: str,
        name: str | None,
        tenant: str,
        spec: dict[str, Any],
        work_store: str | None,
        stages: Iterable[tuple[str, str, int]],
    ) -> PipelineRecord:
        """A new pipeline, running, and its stages (name, pool, depth), waiting."""
        now = self.tx.now
        self.tx.conn.execute(
            insert(t.pipelines).values(
                id=pipeline_id,
                name=name,
                tenant=tenant,
                state=PipelineState.RUNNING.value,
                state_reason="submitted",
                spec=spec,
                work_store=work_store,
                created_at=now,
                updated_at=now,
                version=0,
            )
        )
        self.tx.journal.write(
            "pipeline", pipeline_id, tenant, None, "running", f"submitted by {tenant}"
        )
        rows = [
            dict(
                id=f"{pipeline_id}.{stage}",
                pipeline_id=pipeline_id,
                tenant=tenant,
                name=stage,
                pool=pool,
                depth=depth,
                state=StageState.WAITING.value,
                state_reason="",
                attempts=0,
                level="",
                updated_at=now,
                version=0,
            )
            for stage, pool, depth in stages
        ]
        self.tx.conn.execute(insert(t.pipeline_stages), rows)
        for row in rows:
            self.tx.journal.write("stage", str(row["id"]), tenant, None, "waiting", "submitted")
        found = self.get(pipeline_id)
        assert found is not None
        return found

    def write_transition(
        self,
        pipeline: PipelineRecord,
        target: PipelineState,
        reason: str,
        changes: dict[str, Any],
    ) -> None:
        values = dict(
            changes,
            state=target.value,
            state_reason=reason[:2000],
            updated_at=self.tx.now,
            version=pipeline.version + 1,
        )
        if target not in PIPELINE_LIVE:
            values["finished_at"] = self.tx.now
        done = self.tx.conn.execute(
            _UPDATE_PIPELINE, {**values, "b_id": pipeline.id, "b_version": pipeline.version}
        )
        if done.rowcount != 1:
            raise Stale("pipeline", pipeline.id)
        self.tx.journal.write(
            "pipeline", pipeline.id, pipeline.tenant, pipeline.state.value, target.value, reason
        )
        for key, value in values.items():
            setattr(pipeline, key, value)
        pipeline.state = target

    def update(self, pipeline: PipelineRecord, **values: Any) -> None:
        """Change fields other than the state, guarded by the version."""
        values.update(updated_at=self.tx.now, version=pipeline.version + 1)
        done = self.tx.conn.execute(
            _UPDATE_PIPELINE, {**values, "b_id": pipeline.id, "b_version": pipeline.version}
        )
        if done.rowcount != 1:
            raise Stale("pipeline", pipeline.id)
        for key, value in values.items():
            setattr(pipeline, key, value)

    def write_stage_transition(
        self, stage: StageRecord, target: StageState, reason: str, changes: dict[str, Any]
    ) -> None:
        values = dict(
            changes,
            state=target.value,
            state_reason=reason[:2000],
            updated_at=self.tx.now,
            version=stage.version + 1,
        )
        done = self.tx.conn.execute(
            _UPDATE_STAGE, {**values, "b_id": stage.id, "b_version": stage.version}
        )
        if done.rowcount != 1:
            raise Stale("stage", stage.id)
        self.tx.journal.write(
            "stage", stage.id, stage.tenant, stage.state.value, target.value, reason[:2000]
        )
        for key, value in values.items():
            setattr(stage, key, value)
        stage.state = target

    def update_stage(self, stage: StageRecord, **values: Any) -> None:
        """Change a stage's fields other than its state, guarded by its version."""
        values.update(updated_at=self.tx.now, version=stage.version + 1)
        done = self.tx.conn.execute(
            _UPDATE_STAGE, {**values, "b_id": stage.id, "b_version": stage.version}
        )
        if done.rowcount != 1:
            raise Stale("stage", stage.id)
        for key, value in values.items():
            setattr(stage, key, value)

    def note_stage(self, stage: StageRecord, reason: str) -> None:
        """What happened to a stage that left its state as it was."""
        state = stage.state.value
        self.tx.journal.write("stage", stage.id, stage.tenant, state, state, reason[:2000])

    # -- reads --------------------------------------------------------------------

    def get(self, pipeline_id: str) -> PipelineRecord | None:
        row = self.tx.conn.execute(_GET, {"id": pipeline_id}).first()
        return _pipeline(row) if row else None

    def resolve(self, ref: str, tenant: str) -> PipelineRecord | None:
        """A pipeline by id, else the tenant's newest of that name."""
        found = self.get(ref)
        if found is not None:
            return found
        c = t.pipelines.c
        row = self.tx.conn.execute(
            select(*_P)
            .where(c.name == ref, c.tenant == tenant)
            .order_by(c.created_at.desc())
            .limit(1)
        ).first()
        return _pipeline(row) if row else None

    def live_named(self, tenant: str, name: str) -> PipelineRecord | None:
        c = t.pipelines.c
        row = self.tx.conn.execute(
            select(*_P)
            .where(
                c.tenant == tenant,
                c.name == name,
                c.state.in_([s.value for s in PIPELINE_LIVE]),
            )
            .limit(1)
        ).first()
        return _pipeline(row) if row else None

    def list(self, tenant: str | None = None, limit: int = 100) -> list[PipelineRecord]:
        """The newest `limit` pipelines (one tenant's, or every one's), newest first."""
        c = t.pipelines.c
        query = select(*_P).order_by(c.created_at.desc(), c.id).limit(limit)
        if tenant is not None:
            query = query.where(c.tenant == tenant)
        return [_pipeline(r) for r in self.tx.conn.execute(query)]

    def live_count(self, tenant: str) -> int:
        c = t.pipelines.c
        query = select(func.count()).where(
            c.tenant == tenant, c.state.in_([s.value for s in PIPELINE_LIVE])
        )
        return int(self.tx.conn.execute(query).scalar() or 0)

    def stages(self, pipeline_id: str) -> builtins.list[StageRecord]:
        return [_stage(r) for r in self.tx.conn.execute(_STAGES, {"id": pipeline_id})]

    def stage(self, stage_id: str) -> StageRecord | None:
        row = self.tx.conn.execute(_STAGE, {"id": stage_id}).first()
        return _stage(row) if row else None

    def stages_of_task(self, task_id: str) -> builtins.list[StageRecord]:
        """The stages a task runs: one, or a batch's members."""
        return [_stage(r) for r in self.tx.conn.execute(_OF_TASK, {"id": task_id})]

    def ready_to_run(self, tenant: str, pool: str) -> Iterator[StageRecord]:
        """A pool's ready stages whose pipeline runs: deepest first, then the longest
        waiting (the order in which they get a slot), read as they are taken."""
        rows = self.tx.conn.execute(_READY_TO_RUN, {"tenant": tenant, "pool": pool}).all()
        return (_stage(r) for r in rows)

    def in_state(
        self,
        state: StageState,
        tenant: str | None = None,
        pool: str | None = None,
        name: str | None = None,
    ) -> builtins.list[StageRecord]:
        """Stages in `state` (of one tenant's pool, of one stage name), deepest first, then
        oldest first: the order in which they get a pool slot."""
        c = t.pipeline_stages.c
        query = select(*_S).where(c.state == state.value)
        if tenant is not None:
            query = query.where(c.tenant == tenant)
        if pool is not None:
            query = query.where(c.pool == pool)
        if name is not None:
            query = query.where(c.name == name)
        query = query.order_by(c.depth.desc(), c.updated_at, c.id)
        return [_stage(r) for r in self.tx.conn.execute(query)]

    def holding(self, tenant: str, pool: str) -> int:
        """How many of a tenant's stages of `pool` hold a slot (their task is live)."""
        found = self.tx.conn.execute(_HOLDING, {"tenant": tenant, "pool": pool}).scalar()
        return int(found or 0)

    def due(self, now: float) -> builtins.list[StageRecord]:
        """Stages whose timer has come: retries, wait timers, batch deadlines."""
        c = t.pipeline_stages.c
        query = (
            select(*_S)
            .where(
                c.state.in_(
                    [StageState.RETRYING.value, StageState.HELD.value, StageState.BATCHING.value]
                ),
                c.due_at.is_not(None),
                c.due_at <= now,
            )
            .order_by(c.due_at)
        )
        return [_stage(r) for r in self.tx.conn.execute(query)]

    def next_due(self) -> float | None:
        c = t.pipeline_stages.c
        query = select(func.min(c.due_at)).where(
            c.state.in_(
                [StageState.RETRYING.value, StageState.HELD.value, StageState.BATCHING.value]
            )
        )
        value = self.tx.conn.execute(query).scalar()
        return float(value) if value is not None else None

    def ready_pools(self) -> builtins.list[tuple[str, str]]:
        """(tenant, pool) of every stage that waits for a slot in a running pipeline."""
        c = t.pipeline_stages.c
        query = (
            select(c.tenant, c.pool)
            .join(t.pipelines, t.pipelines.c.id == c.pipeline_id)
            .where(
                c.state == StageState.READY.value,
                t.pipelines.c.state == PipelineState.RUNNING.value,
            )
            .distinct()
        )
        return [(r[0], r[1]) for r in self.tx.conn.execute(query)]

    def history(self, pipeline_id: str) -> builtins.list[JournalRow]:
        return self.tx.journal.of("pipeline", pipeline_id)

    def stage_history(self, stage_id: str) -> builtins.list[JournalRow]:
        return self.tx.journal.of("stage", stage_id)
