"""What pipeline and stage transitions cause: two machines on the lifecycle kernel, and
the owner hook through which a pipeline hears of its stages' tasks.

A stage's task names its pipeline as owner; when the task ends, `on_task` maps how it
ended to a failure level and moves the stage (done, retrying, failed) in the same
transaction as the task's own transition; that frees the stage's pool slot, which
starts the next stage waiting for it (deepest first: work drains rather than piles
up). Nothing here polls: timers (a retry's interval, a wait stage's timer, a batch's
deadline) are stored as `due_at` and fired by the daemon's reaper when due (`fire`).

Pools: a stage of pool P starts only while fewer than the pool's `total` of the
tenant's P stages hold a slot (counted here, under the store's one writer); its task
carries the pool's `per_node` limit, which the scheduler's pool filter holds per node.
"""

from __future__ import annotations

import os
from typing import Any

from gpuprovider.domain.process import failure_kind
from gpuprovider.domain.records import OwnerKind, TaskRecord
from gpuprovider.domain.spec import TaskSpec
from gpuprovider.domain.states import TERMINAL as TASK_TERMINAL
from gpuprovider.domain.states import TaskState
from gpuprovider.lifecycle import tasks
from gpuprovider.lifecycle.kernel import Change, Machine, Refused, Rule
from gpuprovider.pipelines.model import (
    PIPELINE_TERMINAL,
    PIPELINE_TRANSITIONS,
    STAGE_TRANSITIONS,
    PipelineRecord,
    PipelineState,
    StageRecord,
    StageState,
)
from gpuprovider.pipelines.spec import (
    NODE_LABEL,
    PIPELINE_LABEL,
    POOL_LABEL,
    POOL_PER_NODE_LABEL,
    STAGE_LABEL,
    Level,
    PipelineSpec,
    Stage,
)
from gpuprovider.pipelines.status import read_status
from gpuprovider.store.signals import Signal
from gpuprovider.store.store import Tx

P = PipelineState
St = StageState
TS = TaskState
PipelineChange = Change[PipelineState]
StageChange = Change[StageState]
PipelineRule = Rule[Tx, PipelineRecord, PipelineState]
StageRule = Rule[Tx, StageRecord, StageState]
# Failures that are the stage's own (its code exited, was killed for memory or time);
# anything else (its node lost, a start that never happened) runs it again at once.
STAGE_FAULTS = frozenset({"exit_code", "oom", "signal", "max_duration", "start_failed", "other"})
CLEANUP_COMMAND = ["/bin/sh", "-c", "exec find . -mindepth 1 -delete"]


def transition(tx: Tx, pipeline: PipelineRecord, target: PipelineState, why: str) -> None:
    PIPELINES.transition(tx, pipeline, target, why)


def stage_transition(
    tx: Tx, stage: StageRecord, target: StageState, why: str, **fields: Any
) -> None:
    STAGES.transition(tx, stage, target, why, **fields)


def _write(
    tx: Tx, pipeline: PipelineRecord, target: PipelineState, why: str, fields: dict[str, Any]
) -> None:
    tx.pipelines.write_transition(pipeline, target, why, fields)


def _write_stage(
    tx: Tx, stage: StageRecord, target: StageState, why: str, fields: dict[str, Any]
) -> None:
    tx.pipelines.write_stage_transition(stage, target, why, fields)


def _fresh(tx: Tx, pipeline_id: str) -> PipelineRecord:
    found = tx.pipelines.get(pipeline_id)
    assert found is not None, f"pipeline {pipeline_id} vanished"
    return found


# -- moving stages on -----------------------------------------------------------------


def advance(tx: Tx, pipeline: PipelineRecord) -> None:
    """Move the pipeline's stages on: a stage whose stages before it are done becomes
    ready (held, for a wait stage; batching, for a batched one); ready stages start
    while their pools have room; a pipeline whose stages are all done succeeds."""
    if pipeline.state in PIPELINE_TERMINAL:
        return
    spec = pipeline.pipeline_spec
    stages = {s.name: s for s in tx.pipelines.stages(pipeline.id)}
    for stage in stages.values():
        if stage.state != St.WAITING:
            continue
        defined = spec.stage(stage.name)
        if not all(stages[a].state == St.DONE for a in defined.after):
            continue
        if defined.wait is not None:
            if defined.wait.signal:
                stage_transition(tx, stage, St.HELD, "waiting for its signal")
            else:
                timer = defined.wait.timer_s or 0.0
                stage_transition(tx, stage, St.HELD, f"waiting {timer:g}s", due_at=tx.now + timer)
                tx.signal(Signal.TIMERS)
        elif defined.batch is not None:
            stage_transition(
                tx,
                stage,
                St.BATCHING,
                f"waiting for a batch of {defined.batch.size} (or {defined.batch.max_wait_s:g}s)",
                due_at=tx.now + defined.batch.max_wait_s,
            )
            tx.signal(Signal.TIMERS)
        else:
            stage_transition(tx, stage, St.READY, "the stages before it are done")
    stages = {s.name: s for s in tx.pipelines.stages(pipeline.id)}
    if all(s.state == St.DONE for s in stages.values()):
        pipeline = _fresh(tx, pipeline.id)
        if pipeline.state == P.RUNNING:
            transition(tx, pipeline, P.SUCCEEDED, "every stage is done")
        return
    if pipeline.state != P.RUNNING:
        return
    for pool in sorted({s.pool for s in stages.values() if s.state == St.READY}):
        admit(tx, pipeline.tenant, pool)
    for name in sorted({s.name for s in stages.values() if s.state == St.BATCHING}):
        flush(tx, pipeline.tenant, name, full_only=True)


def pool_limits(spec: PipelineSpec, pool: str) -> tuple[int | None, int | None]:
    """(per node, in total) for a pool of this pipeline: None where unlimited."""
    limit = spec.pools.get(pool)
    return (limit.per_node, limit.total) if limit else (None, None)


def admit(tx: Tx, tenant: str, pool: str) -> int:
    """Start the tenant's ready stages of `pool` while it has room: deepest stages first
    (later stages of started pipelines), then the longest waiting. The pool's total is
    the one of the pipeline next in line (pipelines of one tenant share their pools).
    How many started."""
    started = 0
    holding: int | None = None  # counted once a pipeline in line has a total
    for stage in tx.pipelines.ready_to_run(tenant, pool):
        pipeline = _fresh(tx, stage.pipeline_id)
        _, total = pool_limits(pipeline.pipeline_spec, pool)
        if total is not None:
            if holding is None:
                holding = tx.pipelines.holding(tenant, pool)
            if holding >= total:
                break  # the pool is full for the next in line: it waits its turn
        start(tx, pipeline, [stage])
        holding = holding + 1 if holding is not None else None
        started += 1
    return started


def stage_task_spec(
    pipeline: PipelineRecord, defined: Stage, depth: int, extra_env: dict[str, str]
) -> TaskSpec:
    spec = pipeline.pipeline_spec
    per_node, _ = pool_limits(spec, defined.pool_name)
    task_spec = defined.task_spec(spec.priority + depth, spec.node_selector)
    labels = {PIPELINE_LABEL: pipeline.id, STAGE_LABEL: defined.name, POOL_LABEL: defined.pool_name}
    if per_node is not None:
        labels[POOL_PER_NODE_LABEL] = str(per_node)
    if pipeline.work_store and pipeline.node_id:  # the store is a folder of that node
        labels[NODE_LABEL] = pipeline.node_id
    changes: dict[str, Any] = {"labels": labels, "env": {**task_spec.env, **extra_env}}
    if pipeline.work_store:
        changes["workdir"] = pipeline.work_store
    return task_spec.model_copy(update=changes)


def start(tx: Tx, pipeline: PipelineRecord, members: list[StageRecord]) -> TaskRecord:
    """Run a stage (or a batch of the same stage of several pipelines, as one task owned
    by the first member's pipeline) as a task."""
    first = members[0]
    defined = pipeline.pipeline_spec.stage(first.name)
    env = {"PIPELINE_ID": pipeline.id, "PIPELINE_STAGE": first.name}
    if len(members) > 1:
        env["PIPELINE_BATCH"] = " ".join(m.pipeline_id for m in members)
    task_spec = stage_task_spec(pipeline, defined, first.depth, env)
    task = tx.tasks.insert(task_spec, pipeline.tenant, owner=(OwnerKind.PIPELINE, pipeline.id))
    tasks.submit(tx, task)
    why = f"task {task.id} submitted"
    if len(members) > 1:
        why += f" for a batch of {len(members)}"
    for member in members:
        stage_transition(tx, member, St.RUNNING, why, task_id=task.id, started_at=tx.now)
    return task


def flush(tx: Tx, tenant: str, name: str, full_only: bool = False, by: str = "") -> int:
    """Run the tenant's batching `name` stages as batches: the oldest first, up to the
    batch size each; with `full_only`, only full batches. How many members ran."""
    waiting = [
        s
        for s in sorted(
            tx.pipelines.in_state(St.BATCHING, tenant=tenant, name=name),
            key=lambda s: (s.updated_at, s.id),
        )
        if _fresh(tx, s.pipeline_id).state == P.RUNNING
    ]
    ran = 0
    while waiting:
        owner = _fresh(tx, waiting[0].pipeline_id)
        batch = owner.pipeline_spec.stage(name).batch
        size = batch.size if batch else 1
        if full_only and len(waiting) < size:
            break
        members, waiting = waiting[:size], waiting[size:]
        start(tx, owner, members)
        ran += len(members)
        if by:
            for member in members:
                tx.pipelines.note_stage(member, f"flushed by {by}")
    return ran


def fire(tx: Tx, stage: StageRecord) -> None:
    """A stage's timer came: a retry is ready again, a wait is over, a batch runs."""
    if stage.due_at is None or stage.due_at > tx.now:
        return
    if stage.state == St.RETRYING:
        stage_transition(tx, stage, St.READY, "its retry interval passed", due_at=None)
        pipeline = _fresh(tx, stage.pipeline_id)
        if pipeline.state == P.RUNNING:
            admit(tx, stage.tenant, stage.pool)
    elif stage.state == St.HELD:
        stage_transition(tx, stage, St.DONE, "its timer ran out", due_at=None, finished_at=tx.now)
    elif stage.state == St.BATCHING and flush(tx, stage.tenant, stage.name) == 0:
        # its pipeline is paused: look again after another wait
        batch = _fresh(tx, stage.pipeline_id).pipeline_spec.stage(stage.name).batch
        wait = batch.max_wait_s if batch else 0.0
        tx.pipelines.update_stage(stage, due_at=tx.now + max(wait, 1.0))


def signal(tx: Tx, pipeline: PipelineRecord, name: str, by: str) -> None:
    stage = next((s for s in tx.pipelines.stages(pipeline.id) if s.name == name), None)
    if stage is None:
        raise Refused(f"stage: {pipeline.id} has no stage {name!r}")
    defined = pipeline.pipeline_spec.stage(name)
    if defined.wait is None or not defined.wait.signal:
        raise Refused(f"stage: {name} waits for no signal (it is not a `wait: signal` stage)")
    if stage.state != St.HELD:
        raise Refused(f"stage: {name} is {stage.state}, not waiting for its signal now")
    stage_transition(tx, stage, St.DONE, f"signalled by {by}", finished_at=tx.now)


# -- what a stage's task did ----------------------------------------------------------


def _workdir(pipeline: PipelineRecord, task: TaskRecord) -> str | None:
    if pipeline.work_store:
        return pipeline.work_store
    return os.path.join(task.run_dir, "work") if task.run_dir else None


def level_of(
    pipeline: PipelineRecord, stage: StageRecord, task: TaskRecord
) -> tuple[Level | None, str]:
    """How the stage's run ended: None for success, else its failure level, and why."""
    folder = _workdir(pipeline, task)
    said = read_status(folder, task.started_at or task.created_at) if folder else None
    defined = pipeline.pipeline_spec.stage(stage.name)
    if task.state == TS.SUCCEEDED:
        if said is not None and said.level is not None:
            return said.level, f"its status file says {said.level}: {said.reason}"
        return None, "its task succeeded"
    if said is not None:
        if said.level is None:
            return None, f"its status file says ok: {said.reason}"
        return said.level, f"its status file says {said.level}: {said.reason}"
    level = (
        defined.failure.level_of(task.exit_code)
        if task.exit_code is not None
        else defined.failure.default
    )
    return level, f"task {task.id} {task.state_reason}"


def _stage_ended(tx: Tx, pipeline: PipelineRecord, stage: StageRecord, task: TaskRecord) -> None:
    defined = pipeline.pipeline_spec.stage(stage.name)
    if task.state == TS.CANCELLED or task.state == TS.EXPIRED:
        if pipeline.state in (P.CANCELLING, P.ABORTING):
            stage_transition(tx, stage, St.CANCELLED, f"pipeline {pipeline.state}")
        elif pipeline.state == P.PAUSED:
            stage_transition(tx, stage, St.READY, "stopped by the pause; runs again on resume")
        else:
            stage_transition(
                tx,
                stage,
                St.FAILED,
                f"task {task.id} {task.state}: {task.state_reason}",
                level=Level.PERMANENT.value,
                finished_at=tx.now,
            )
            current = _fresh(tx, pipeline.id)
            if current.state == P.RUNNING:
                why = f"stage {stage.name}: its task was {task.state}"
                transition(tx, current, P.PAUSED, why)
        return
    if task.state == TS.FAILED and failure_kind(task.state_reason) not in STAGE_FAULTS:
        # lost with its node, never started: not the stage's fault, and not counted
        if pipeline.state == P.RUNNING:
            new = start_again(tx, pipeline, stage)
            tx.pipelines.note_stage(
                stage, f"task {task.id} {task.state_reason}; not its fault: runs as {new.id}"
            )
        else:
            stage_transition(
                tx, stage, St.READY, f"task {task.id} {task.state_reason}; runs again on resume"
            )
        return
    level, why = level_of(pipeline, stage, task)
    if level is None:
        stage_transition(tx, stage, St.DONE, why, level="", finished_at=tx.now)
        return
    if level == Level.TEMPORARY:
        if stage.attempts < defined.failure.max_retries:
            interval = defined.failure.retry_interval_s
            stage_transition(
                tx,
                stage,
                St.RETRYING,
                f"{why}; temporary: retry {stage.attempts + 1} of "
                f"{defined.failure.max_retries} in {interval:g}s",
                attempts=stage.attempts + 1,
                level=level.value,
                due_at=tx.now + interval,
            )
            tx.signal(Signal.TIMERS)
            return
        why += f"; temporary, but retried {defined.failure.max_retries} times: permanent"
        level = Level.PERMANENT
    stage_transition(
        tx,
        stage,
        St.FAILED,
        f"{why} ({level})",
        attempts=stage.attempts + 1,
        level=level.value,
        finished_at=tx.now,
    )
    pipeline = _fresh(tx, pipeline.id)
    if level == Level.ABORT:
        if pipeline.state not in (P.ABORTING, *PIPELINE_TERMINAL, P.CANCELLING):
            transition(tx, pipeline, P.ABORTING, f"stage {stage.name} aborted: {why}")
    elif pipeline.state == P.RUNNING:
        transition(
            tx,
            pipeline,
            P.PAUSED,
            f"stage {stage.name} failed ({level}): {why}; waiting for a person (pipeline resume)",
        )


def start_again(tx: Tx, pipeline: PipelineRecord, stage: StageRecord) -> TaskRecord:
    defined = pipeline.pipeline_spec.stage(stage.name)
    env = {"PIPELINE_ID": pipeline.id, "PIPELINE_STAGE": stage.name}
    task_spec = stage_task_spec(pipeline, defined, stage.depth, env)
    task = tx.tasks.insert(task_spec, pipeline.tenant, owner=(OwnerKind.PIPELINE, pipeline.id))
    tasks.submit(tx, task)
    tx.pipelines.update_stage(stage, task_id=task.id, started_at=tx.now)
    return task


def on_task(tx: Tx, task: TaskRecord, change: tasks.TaskChange) -> None:
    """A task the pipeline owns changed state (after its own rules)."""
    pipeline = tx.pipelines.get(task.owner_id or "")
    if pipeline is None:
        return
    if task.id == pipeline.cleanup_task_id:
        if task.state in TASK_TERMINAL and pipeline.state == P.ABORTING:
            transition(
                tx,
                pipeline,
                P.ABORTED,
                f"its work store was cleaned: task {task.id} {task.state_reason}",
            )
        return
    if task.state == TS.SCHEDULED and task.node_id and pipeline.node_id is None:
        tx.pipelines.update(pipeline, node_id=task.node_id)
    if task.state not in TASK_TERMINAL:
        return
    for stage in tx.pipelines.stages_of_task(task.id):
        if stage.state != St.RUNNING:
            continue  # cancelled out of a batch others still run
        member = _fresh(tx, stage.pipeline_id)
        _stage_ended(tx, member, stage, task)
        _after_stage(tx, _fresh(tx, stage.pipeline_id), stage)


def _after_stage(tx: Tx, pipeline: PipelineRecord, stage: StageRecord) -> None:
    """A stage left `running`: its slot is free, and its pipeline may move on or end."""
    if pipeline.state in (P.CANCELLING, P.ABORTING):
        _finish_stopping(tx, pipeline)
    elif pipeline.state in (P.RUNNING, P.PAUSED):  # paused: stages become ready, none starts
        advance(tx, pipeline)
    admit(tx, stage.tenant, stage.pool)


def _finish_stopping(tx: Tx, pipeline: PipelineRecord) -> None:
    """A cancelling or aborting pipeline ends once none of its stages runs: an aborted
    one after a task has cleaned its work store."""
    if pipeline.state not in (P.CANCELLING, P.ABORTING):
        return  # ended meanwhile (a stage that never started ended at once)
    stages = tx.pipelines.stages(pipeline.id)
    if any(s.state == St.RUNNING for s in stages):
        return
    for stage in stages:
        if stage.state not in (St.DONE, St.CANCELLED, St.FAILED):
            stage_transition(tx, stage, St.CANCELLED, f"pipeline {pipeline.state}")
    if pipeline.state == P.CANCELLING:
        transition(tx, pipeline, P.CANCELLED, "none of its stages runs any more")
    elif pipeline.work_store and pipeline.cleanup_task_id is None:
        spec = TaskSpec.model_validate(
            {
                "command": CLEANUP_COMMAND,
                "workdir": pipeline.work_store,
                "labels": {PIPELINE_LABEL: pipeline.id},
            }
        )
        task = tx.tasks.insert(spec, pipeline.tenant, owner=(OwnerKind.PIPELINE, pipeline.id))
        tx.pipelines.update(pipeline, cleanup_task_id=task.id)
        tasks.submit(tx, task)
    elif not pipeline.work_store:
        transition(
            tx, pipeline, P.ABORTED, "none of its stages runs any more (no work store to clean)"
        )


# -- the rules ----------------------------------------------------------------------


def _stop_stages(tx: Tx, pipeline: PipelineRecord, change: PipelineChange) -> None:
    """A cancelled or aborted pipeline stops its stages' tasks (a batch others share
    runs on without it), then ends once none runs."""
    for stage in tx.pipelines.stages(pipeline.id):
        if stage.state != St.RUNNING or stage.task_id is None:
            continue
        sharing = [
            s
            for s in tx.pipelines.stages_of_task(stage.task_id)
            if s.state == St.RUNNING and s.pipeline_id != pipeline.id
        ]
        task = tx.tasks.get(stage.task_id)
        if sharing or task is None or task.state in TASK_TERMINAL:
            stage_transition(tx, stage, St.CANCELLED, f"pipeline {change.target}")
        elif task.state != TS.CANCELLING:
            tasks.request_cancel(tx, task, f"pipeline {pipeline.id}: {change.reason}")
    _finish_stopping(tx, _fresh(tx, pipeline.id))


def _move_on(tx: Tx, pipeline: PipelineRecord, change: PipelineChange) -> None:
    advance(tx, _fresh(tx, pipeline.id))


def _advance_owner(tx: Tx, stage: StageRecord, change: StageChange) -> None:
    pipeline = _fresh(tx, stage.pipeline_id)
    if pipeline.state == P.RUNNING:
        advance(tx, pipeline)


PIPELINE_RULES: list[PipelineRule] = [
    PipelineRule(
        "stop-stages",
        "a cancelled or aborted pipeline stops its stages' tasks, then ends",
        frozenset({P.CANCELLING, P.ABORTING}),
        then=_stop_stages,
    ),
    PipelineRule(
        "move-on",
        "a resumed pipeline starts the stages that may run",
        frozenset({P.RUNNING}),
        frozenset({P.PAUSED}),
        then=_move_on,
    ),
]
STAGE_RULES: list[StageRule] = [
    StageRule(
        "next-stages",
        "a done stage lets the stages after it run (a wait stage's timer or signal too)",
        frozenset({St.DONE}),
        frozenset({St.HELD}),
        then=_advance_owner,
    ),
]
PIPELINES: Machine[Tx, PipelineRecord, PipelineState] = Machine(
    "pipeline",
    PIPELINE_TRANSITIONS,
    write=_write,
    state_of=lambda p: p.state,
    subject_of=lambda p: p.id,
    rules=PIPELINE_RULES,
)
STAGES: Machine[Tx, StageRecord, StageState] = Machine(
    "stage",
    STAGE_TRANSITIONS,
    write=_write_stage,
    state_of=lambda s: s.state,
    subject_of=lambda s: s.id,
    rules=STAGE_RULES,
)


# -- what a person asks ---------------------------------------------------------------


def pause(tx: Tx, pipeline: PipelineRecord, by: str, stop: bool) -> None:
    """Start no more stages; with `stop`, stop the running ones too (they run again on
    resume), else let them finish."""
    if pipeline.state != P.RUNNING:
        raise Refused(f"pipeline {pipeline.id} is {pipeline.state}; only a running one pauses")
    transition(
        tx, pipeline, P.PAUSED, f"paused by {by}" + (" (running stages stopped)" if stop else "")
    )
    if not stop:
        return
    for stage in tx.pipelines.stages(pipeline.id):
        if stage.state != St.RUNNING or stage.task_id is None:
            continue
        shared = any(
            s.pipeline_id != pipeline.id for s in tx.pipelines.stages_of_task(stage.task_id)
        )
        task = tx.tasks.get(stage.task_id)
        if shared or task is None or task.state in TASK_TERMINAL or task.state == TS.CANCELLING:
            continue  # a batch others share runs on: this member finishes with it
        tasks.request_cancel(tx, task, f"pipeline {pipeline.id} paused by {by}")


def resume(tx: Tx, pipeline: PipelineRecord, by: str, from_stage: str | None) -> None:
    """Run a paused pipeline again: its failed stages run again, or (`from_stage`) that
    stage and every stage after it, whatever their state."""
    if pipeline.state != P.PAUSED:
        raise Refused(f"pipeline {pipeline.id} is {pipeline.state}; only a paused one resumes")
    spec = pipeline.pipeline_spec
    stages = tx.pipelines.stages(pipeline.id)
    if from_stage is not None:
        if from_stage not in {s.name for s in stages}:
            raise Refused(
                f"from: {pipeline.id} has no stage {from_stage!r}; its stages are "
                + ", ".join(s.name for s in stages)
            )
        again = spec.descendants(from_stage)
        busy = [s.name for s in stages if s.name in again and s.state == St.RUNNING]
        if busy:
            raise Refused(
                f"from: stage {busy[0]} is still running; wait for it, or pause with --stop"
            )
    else:
        again = {s.name for s in stages if s.state == St.FAILED}
    for stage in stages:
        if stage.name in again and stage.state != St.WAITING:
            stage_transition(
                tx,
                stage,
                St.WAITING,
                f"resumed by {by}" + (f" from {from_stage}" if from_stage else ""),
                attempts=0,
                level="",
                due_at=None,
                task_id=None,
                finished_at=None,
            )
    why = f"resumed by {by}" + (f" from stage {from_stage}" if from_stage else "")
    transition(tx, _fresh(tx, pipeline.id), P.RUNNING, why)


def cancel(tx: Tx, pipeline: PipelineRecord, by: str) -> None:
    if pipeline.state in PIPELINE_TERMINAL or pipeline.state in (P.CANCELLING, P.ABORTING):
        raise Refused(f"pipeline {pipeline.id} is {pipeline.state} already")
    transition(tx, pipeline, P.CANCELLING, f"cancel requested by {by}")


tasks.OWNERS[OwnerKind.PIPELINE] = on_task
