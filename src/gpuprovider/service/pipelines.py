"""Pipeline operations behind the API: submit, list, inspect, pause, resume, cancel,
signal, flush, logs; and the timers the reaper fires (`PipelineTimers`)."""

from __future__ import annotations

import os
from typing import Any

from gpuprovider.config import PipelineTenantConfig
from gpuprovider.domain.records import TokenRecord
from gpuprovider.lifecycle import pipelines as lifecycle
from gpuprovider.lifecycle.kernel import IllegalTransition, Refused, Stale
from gpuprovider.pipelines.model import PipelineRecord, StageRecord
from gpuprovider.pipelines.spec import MAX_LIVE_PIPELINES, PipelineSpec
from gpuprovider.service.errors import Conflict, NotFound, Rejected
from gpuprovider.service.tasks import TaskService
from gpuprovider.store.pipelines import new_pipeline_id
from gpuprovider.store.store import Store


def apply_overrides(spec: PipelineSpec, override: PipelineTenantConfig | None) -> PipelineSpec:
    """The spec with the tenant's overrides (pool limits, retries) applied: what runs."""
    if override is None:
        return spec
    data = spec.model_dump(mode="json")
    for pool, limit in override.pools.items():
        mine = data["pools"].setdefault(pool, {})
        if limit.per_node is not None:
            mine["per_node"] = limit.per_node
        if limit.total is not None:
            mine["total"] = limit.total
    uses = {s.pool_name for s in spec.stages}
    data["pools"] = {k: v for k, v in data["pools"].items() if k in uses}
    if override.max_retries is not None:
        for stage in data["stages"]:
            stage["failure"]["max_retries"] = override.max_retries
    return PipelineSpec.model_validate(data)


def stage_view(stage: StageRecord) -> dict[str, Any]:
    return {
        "name": stage.name,
        "state": stage.state.value,
        "reason": stage.state_reason,
        "pool": stage.pool,
        "task": stage.task_id,
        "attempts": stage.attempts,
        "level": stage.level,
        "due_at": stage.due_at,
        "started_at": stage.started_at,
        "finished_at": stage.finished_at,
    }


def pipeline_view(pipeline: PipelineRecord, stages: list[StageRecord]) -> dict[str, Any]:
    return {
        "id": pipeline.id,
        "name": pipeline.name,
        "tenant": pipeline.tenant,
        "state": pipeline.state.value,
        "reason": pipeline.state_reason,
        "work_store": pipeline.work_store,
        "node": pipeline.node_id,
        "created_at": pipeline.created_at,
        "finished_at": pipeline.finished_at,
        "stages": [stage_view(s) for s in stages],
    }


class PipelineService:
    def __init__(
        self,
        store: Store,
        tasks: TaskService,
        workdir_roots: list[str],
        overrides: dict[str, PipelineTenantConfig] | None = None,
    ):
        self.store = store
        self.tasks = tasks
        self.workdir_roots = workdir_roots
        self.overrides = overrides or {}

    # -- submit -----------------------------------------------------------------------

    def check(self, spec: PipelineSpec, who: TokenRecord) -> PipelineSpec:
        """The spec as it will run, or Rejected naming the field: a work store outside
        the allowed roots, a stage this provider cannot run or no node can hold."""
        if spec.work_store is not None and not any(
            spec.work_store == root or spec.work_store.startswith(root.rstrip("/") + "/")
            for root in self.workdir_roots
        ):
            roots = ", ".join(self.workdir_roots) or "none are configured"
            raise Rejected(
                f"work_store: {spec.work_store} is outside the folders tasks may use "
                f"([isolation] workdir_roots: {roots})"
            )
        effective = apply_overrides(spec, self.overrides.get(who.tenant))
        with self.store.read() as r:
            for stage in effective.stages:
                if stage.wait is not None:
                    continue
                try:
                    self.tasks.check_runnable(stage.task_spec(0, spec.node_selector), r)
                except Rejected as exc:
                    raise Rejected(f"stages.{stage.name}.{exc}") from None
        return effective

    def submit(self, spec: PipelineSpec, who: TokenRecord) -> dict[str, Any]:
        effective = self.check(spec, who)
        pipeline_id = new_pipeline_id()
        store = os.path.join(spec.work_store, pipeline_id) if spec.work_store else None
        depth = effective.depth()
        with self.store.tx() as tx:
            if spec.name and (holder := tx.pipelines.live_named(who.tenant, spec.name)):
                raise Conflict(
                    f"name: a live pipeline is already named {spec.name!r} ({holder.id}); "
                    "cancel it or choose another name"
                )
            live = tx.pipelines.live_count(who.tenant)
            if live >= MAX_LIVE_PIPELINES:
                raise Rejected(
                    f"tenant {who.tenant} has {live} live pipelines; at most "
                    f"{MAX_LIVE_PIPELINES}: wait for some to end"
                )
            pipeline = tx.pipelines.insert(
                pipeline_id,
                spec.name,
                who.tenant,
                effective.model_dump(mode="json", exclude_defaults=True),
                store,
                [(s.name, s.pool_name, depth[s.name]) for s in effective.stages],
            )
            lifecycle.advance(tx, pipeline)
            pipeline = tx.pipelines.get(pipeline_id) or pipeline
            return pipeline_view(pipeline, tx.pipelines.stages(pipeline_id))

    # -- reads ------------------------------------------------------------------------

    def visible(self, ref: str, who: TokenRecord, tx: Any) -> PipelineRecord:
        found = tx.pipelines.resolve(ref, who.tenant)
        if found is None or not who.sees(found.tenant):
            raise NotFound(f"no pipeline {ref!r}; `gpuprovider pipeline list` shows yours")
        return found

    def list(self, who: TokenRecord, limit: int = 100) -> list[dict[str, Any]]:
        with self.store.read() as r:
            found = r.pipelines.list(None if who.is_admin else who.tenant, limit)
            return [pipeline_view(p, r.pipelines.stages(p.id)) for p in found]

    def detail(self, ref: str, who: TokenRecord) -> dict[str, Any]:
        with self.store.read() as r:
            pipeline = self.visible(ref, who, r)
            view = pipeline_view(pipeline, r.pipelines.stages(pipeline.id))
            view["events"] = [row.brief() for row in r.pipelines.history(pipeline.id)]
            view["spec"] = pipeline.spec
            return view

    def stage_task(self, ref: str, stage: str, who: TokenRecord) -> str:
        """The task of a pipeline's stage (its latest run), for its logs."""
        with self.store.read() as r:
            pipeline = self.visible(ref, who, r)
            found = next((s for s in r.pipelines.stages(pipeline.id) if s.name == stage), None)
        if found is None:
            raise NotFound(f"stage: {pipeline.id} has no stage {stage!r}")
        if found.task_id is None:
            raise NotFound(f"stage {stage} of {pipeline.id} has not run yet ({found.state})")
        return found.task_id

    # -- what a person asks -------------------------------------------------------------

    def _act(self, ref: str, who: TokenRecord, action: Any, *args: Any) -> dict[str, Any]:
        for _ in range(3):  # a stage's task moving meanwhile: read again, decide again
            try:
                with self.store.tx() as tx:
                    pipeline = self.visible(ref, who, tx)
                    action(tx, pipeline, who.name, *args)
                    fresh = tx.pipelines.get(pipeline.id) or pipeline
                    return pipeline_view(fresh, tx.pipelines.stages(pipeline.id))
            except Refused as exc:
                raise Conflict(str(exc)) from None
            except IllegalTransition as exc:
                raise Conflict(str(exc)) from None
            except Stale:
                continue
        raise Conflict(f"pipeline {ref} keeps changing; try again")

    def pause(self, ref: str, who: TokenRecord, stop: bool = False) -> dict[str, Any]:
        return self._act(ref, who, lifecycle.pause, stop)

    def resume(self, ref: str, who: TokenRecord, from_stage: str | None = None) -> dict[str, Any]:
        return self._act(ref, who, lifecycle.resume, from_stage)

    def cancel(self, ref: str, who: TokenRecord) -> dict[str, Any]:
        return self._act(ref, who, lifecycle.cancel)

    def signal(self, ref: str, stage: str, who: TokenRecord) -> dict[str, Any]:
        def act(tx: Any, pipeline: PipelineRecord, by: str) -> None:
            lifecycle.signal(tx, pipeline, stage, by)

        return self._act(ref, who, act)

    def flush(self, stage: str, who: TokenRecord) -> dict[str, Any]:
        """Run the caller's pipelines waiting in batch stage `stage` now, in batches."""
        with self.store.tx() as tx:
            ran = lifecycle.flush(tx, who.tenant, stage, by=who.name)
        return {"stage": stage, "flushed": ran}


class PipelineTimers:
    """Fires stages' timers (retry intervals, wait timers, batch deadlines) when due, and
    starts ready stages a pool has room for (a safety net: a slot freed always starts
    them at once). Called by the reaper; how soon it wants the next call."""

    def __init__(self, store: Store):
        self.store = store

    def tick(self) -> float | None:
        with self.store.read() as r:
            due = r.pipelines.due(r.now)
            pools = r.pipelines.ready_pools()
        for stage in due:
            try:
                with self.store.tx() as tx:
                    fresh = tx.pipelines.stage(stage.id)
                    if fresh is not None and fresh.state == stage.state:
                        lifecycle.fire(tx, fresh)
            except Stale:
                continue  # moved meanwhile: the next pass sees it as it is
        for tenant, pool in pools:
            try:
                with self.store.tx() as tx:
                    lifecycle.admit(tx, tenant, pool)
            except Stale:
                continue
        with self.store.read() as r:
            soonest = r.pipelines.next_due()
        return None if soonest is None else max(0.0, soonest - r.now)
