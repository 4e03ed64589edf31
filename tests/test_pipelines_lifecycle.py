"""The pipeline and stage machines on a store alone (no daemon): tasks placed, run and
ended by hand, to try what a real daemon makes rare (a node lost under a stage, a
preemption) and the machines' tables."""

from pathlib import Path

from gpuprovider.domain.process import Exit
from gpuprovider.domain.states import TaskState
from gpuprovider.lifecycle import pipelines as lifecycle
from gpuprovider.lifecycle import tasks as task_lifecycle
from gpuprovider.pipelines.spec import PipelineSpec
from gpuprovider.store.pipelines import new_pipeline_id
from gpuprovider.testing import StoreWorld


def make(world: StoreWorld, **extra) -> str:
    spec = PipelineSpec.model_validate(
        {
            "stages": [
                {"name": "a", "command": ["true"]},
                {"name": "b", "after": ["a"], "command": ["true"]},
            ],
            **extra,
        }
    )
    depth = spec.depth()
    pipeline_id = new_pipeline_id()
    with world.store.tx() as tx:
        made = tx.pipelines.insert(
            pipeline_id,
            None,
            "team",
            spec.model_dump(mode="json", exclude_defaults=True),
            None,
            [(s.name, s.pool_name, depth[s.name]) for s in spec.stages],
        )
        lifecycle.advance(tx, made)
    return pipeline_id


def stage(world: StoreWorld, pipeline_id: str, name: str):
    with world.store.read() as r:
        return next(s for s in r.pipelines.stages(pipeline_id) if s.name == name)


def state(world: StoreWorld, pipeline_id: str) -> str:
    with world.store.read() as r:
        return r.pipelines.get(pipeline_id).state.value


def test_a_node_lost_under_a_stage_runs_it_again_uncounted(tmp_path: Path):
    world = StoreWorld(tmp_path)
    pipeline_id = make(world)
    first = world.get(stage(world, pipeline_id, "a").task_id)
    world.run(first)
    world.end(first, Exit(None, "lost: its node stopped answering", lost=True))
    again = stage(world, pipeline_id, "a")
    assert again.state == "running" and again.attempts == 0
    assert again.task_id != first.id
    assert world.get(again.task_id).state == TaskState.QUEUED
    assert state(world, pipeline_id) == "running"


def test_a_preempted_stage_keeps_its_task_and_its_slot(tmp_path: Path):
    world = StoreWorld(tmp_path)
    pipeline_id = make(world)
    task = world.get(stage(world, pipeline_id, "a").task_id)
    world.run(task)
    with world.store.tx() as tx:
        task_lifecycle.transition(tx, task, TaskState.PREEMPTED, "preempted by higher work")
    world.end(task, Exit(None, "killed by signal 15", stopped=True))
    now = stage(world, pipeline_id, "a")
    assert now.state == "running" and now.task_id == task.id and now.attempts == 0
    assert world.get(task.id).state == TaskState.QUEUED  # re-queued by the task's rules


def test_the_machines_tables_hold_their_rules():
    for machine in (lifecycle.PIPELINES, lifecycle.STAGES):
        machine.check_rules()
        assert machine.describe()


def test_a_pause_lets_the_running_stage_finish_and_starts_nothing_more(tmp_path: Path):
    world = StoreWorld(tmp_path)
    pipeline_id = make(world)
    task = world.get(stage(world, pipeline_id, "a").task_id)
    world.run(task)
    with world.store.tx() as tx:
        lifecycle.pause(tx, tx.pipelines.get(pipeline_id), "alice", stop=False)
    world.end(task, Exit(0, "exited with code 0"))
    assert stage(world, pipeline_id, "a").state == "done"
    assert stage(world, pipeline_id, "b").state == "ready"  # not started while paused
    with world.store.tx() as tx:
        lifecycle.resume(tx, tx.pipelines.get(pipeline_id), "alice", None)
    assert stage(world, pipeline_id, "b").state == "running"
