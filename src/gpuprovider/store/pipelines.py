"""Pipelines and their stages. Writes of state go through the lifecycle (guarded by
each record's version, with a journal row)."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, insert, select, update

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
from gpuprovider.store.rows import record

if TYPE_CHECKING:
    from gpuprovider.store.store import Tx

_P = [t.pipelines.c[f.name] for f in fields(PipelineRecord)]
_S = [t.pipeline_stages.c[f.name] for f in fields(StageRecord)]


def _pipeline(row: Any) -> PipelineRecord:
    found = record(PipelineRecord, row)
    found.state = PipelineState(found.state)
    return found


def _stage(row: Any) -> StageRecord:
    found = record(StageRecord, row)
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
            update(t.pipelines)
            .where(t.pipelines.c.id == pipeline.id, t.pipelines.c.version == pipeline.version)
            .values(**values)
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
            update(t.pipelines)
            .where(t.pipelines.c.id == pipeline.id, t.pipelines.c.version == pipeline.version)
            .values(**values)
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
            update(t.pipeline_stages)
            .where(
                t.pipeline_stages.c.id == stage.id,
                t.pipeline_stages.c.version == stage.version,
            )
            .values(**values)
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
            update(t.pipeline_stages)
            .where(
                t.pipeline_stages.c.id == stage.id,
                t.pipeline_stages.c.version == stage.version,
            )
            .values(**values)
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
        row = self.tx.conn.execute(select(*_P).where(t.pipelines.c.id == pipeline_id)).first()
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

    def stages(self, pipeline_id: str) -> list[StageRecord]:
        c = t.pipeline_stages.c
        query = select(*_S).where(c.pipeline_id == pipeline_id).order_by(c.depth, c.name)
        return [_stage(r) for r in self.tx.conn.execute(query)]

    def stage(self, stage_id: str) -> StageRecord | None:
        row = self.tx.conn.execute(select(*_S).where(t.pipeline_stages.c.id == stage_id)).first()
        return _stage(row) if row else None

    def stages_of_task(self, task_id: str) -> list[StageRecord]:
        """The stages a task runs: one, or a batch's members."""
        c = t.pipeline_stages.c
        query = select(*_S).where(c.task_id == task_id).order_by(c.id)
        return [_stage(r) for r in self.tx.conn.execute(query)]

    def in_state(
        self,
        state: StageState,
        tenant: str | None = None,
        pool: str | None = None,
        name: str | None = None,
    ) -> list[StageRecord]:
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
        c = t.pipeline_stages.c
        query = select(func.count(func.distinct(c.task_id))).where(
            c.tenant == tenant, c.pool == pool, c.state == StageState.RUNNING.value
        )
        return int(self.tx.conn.execute(query).scalar() or 0)

    def due(self, now: float) -> list[StageRecord]:
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

    def ready_pools(self) -> list[tuple[str, str]]:
        """(tenant, pool) of every stage that waits for a slot."""
        c = t.pipeline_stages.c
        query = select(c.tenant, c.pool).where(c.state == StageState.READY.value).distinct()
        return [(r[0], r[1]) for r in self.tx.conn.execute(query)]

    def history(self, pipeline_id: str) -> list[JournalRow]:
        return self.tx.journal.of("pipeline", pipeline_id)

    def stage_history(self, stage_id: str) -> list[JournalRow]:
        return self.tx.journal.of("stage", stage_id)
