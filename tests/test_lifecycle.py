"""Each lifecycle rule, alone, on a real SQLite store and no daemon: what a task or node
transition causes, in the transaction that makes it."""

import time
from dataclasses import replace

import pytest

from gpuprovider.domain.nodes import NodeStatus
from gpuprovider.domain.process import Exit
from gpuprovider.domain.states import TaskState
from gpuprovider.domain.usability import Usability
from gpuprovider.lifecycle import nodes as node_lifecycle
from gpuprovider.lifecycle.kernel import Change, IllegalTransition
from gpuprovider.lifecycle.nodes import Refused, node_lost, node_seen, operator_sets
from gpuprovider.lifecycle.tasks import (
    TASK_RULES,
    request_cancel,
    service_restart,
    start_failed,
    transition,
)
from gpuprovider.service.placement import build_snapshot
from gpuprovider.service.views import gpu_views, node_view
from gpuprovider.store.signals import Signal
from gpuprovider.testing import NODE, StoreWorld, node_record

S, N = TaskState, NodeStatus


@pytest.fixture
def world(tmp_path):
    made = StoreWorld(tmp_path)
    yield made
    made.store.close()


FAILED = Exit(1, "exited with code 1")


def test_every_rule_is_named_and_bound_to_some_transition():
    names = [r.name for r in TASK_RULES]
    assert len(names) == len(set(names)) and all(r.doc and r.targets for r in TASK_RULES)


def test_count_attempt_and_stamp_start(world):
    task = world.submit()
    world.run(task)
    got = world.get(task.id)
    assert got.attempt == 1 and got.started_at and got.pid == 4242


def test_release_gives_the_allocation_back_and_signals_capacity(world):
    task = world.submit()
    world.run(task)
    assert len(world.allocations()) == 1
    world.fired.clear()
    world.end(task, Exit(0, "exited with code 0"))
    assert world.get(task.id).state == S.SUCCEEDED and world.allocations() == []
    assert (Signal.CAPACITY, set()) in world.fired


def test_signals_wake_who_must_act(world):
    task = world.submit()
    assert world.fired == [(Signal.QUEUED, {task.id})]
    world.place(task)
    assert world.fired[-1] == (Signal.PLACED, {task.id})
    with world.store.tx() as tx:
        transition(tx, task, S.STARTING, "starting")
        transition(tx, task, S.RUNNING, "running", pid=1)
        transition(tx, task, S.PREEMPTED, "evicted")
    assert world.fired[-1] == (Signal.STOP, {task.id})


def test_preempted_work_comes_back_counting_the_preemption_not_a_failure(world):
    task = world.submit()
    world.run(task)
    world.apply(transition, task, S.PREEMPTED, "make room")
    world.end(task, Exit(None, "stopped on request", stopped=True))
    back = world.get(task.id)
    assert back.state == S.QUEUED and back.preemptions == 1 and back.attempt == 1
    assert back.node_id is None and back.pid is None  # clear-placement
    assert world.allocations() == []


def test_retry_queues_the_next_attempt_after_its_backoff_then_stops(world):
    task = world.submit(retry={"attempts": 2, "backoff_s": 30})
    world.run(task)
    world.end(task, FAILED)
    retried = world.get(task.id)
    assert retried.state == S.QUEUED and retried.not_before > time.time() + 25
    assert "retry: attempt 2 of 2" in retried.state_reason
    world.run(retried)
    world.end(retried, FAILED)
    assert world.get(task.id).state == S.FAILED  # attempts used up


def test_a_service_always_restarts(world):
    task = world.submit(kind="service")
    world.run(task)
    world.end(task, Exit(0, "exited with code 0"))
    assert world.get(task.id).state == S.QUEUED
    assert "service restarting" in world.get(task.id).state_reason


def test_a_crash_looping_service_backs_off_whatever_its_spec_asks(world):
    # A tenant asks for no backoff at all; the provider's holds: 1 s, 2 s, 4 s ... 300 s.
    task = world.submit(kind="service", retry={"backoff_s": 0, "backoff_factor": 1})
    waits = []
    for _ in range(12):
        task = world.get(task.id)
        world.run(task)
        world.end(task, FAILED)  # at once: a crash loop
        restarted = world.get(task.id)
        assert restarted.state == S.QUEUED
        waits.append(round(restarted.not_before - restarted.updated_at))
    assert waits == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]
    # A run that lasted starts the streak again: a service that crashes once a day
    # comes back in a second, not in five minutes.
    lasted = replace(restarted, started_at=time.time() - 3600)
    change = Change(S.RUNNING, S.FAILED, "exited with code 1")
    assert service_restart(lasted, change, time.time()) == (1.0, 1)
    # The spec may ask to wait longer than the provider would.
    patient = world.submit(kind="service", retry={"backoff_s": 30})
    world.run(patient)
    world.end(patient, FAILED)
    patient = world.get(patient.id)
    assert round(patient.not_before - patient.updated_at) == 30


def test_cancel_before_any_process_ends_at_once(world):
    queued = world.submit()
    world.apply(request_cancel, queued, "alice")
    assert world.get(queued.id).state == S.CANCELLED
    assert world.events(queued)[-2:] == [("queued", "cancelling"), ("cancelling", "cancelled")]
    placed = world.submit()
    world.place(placed)
    world.apply(request_cancel, placed, "alice")
    assert world.get(placed.id).state == S.CANCELLED and world.allocations() == []


def test_cancel_while_starting_or_running_waits_for_the_process(world):
    starting = world.submit()
    world.place(starting)
    world.apply(transition, starting, S.STARTING, "starting")
    world.apply(request_cancel, starting, "alice")
    assert world.get(starting.id).state == S.CANCELLING  # a runner may be starting now
    preempted = world.submit()
    world.run(preempted)
    world.apply(transition, preempted, S.PREEMPTED, "make room")
    world.apply(request_cancel, preempted, "alice")  # was refused before: a 500
    assert world.get(preempted.id).state == S.CANCELLING


def test_a_start_that_never_happened_costs_no_attempt(world):
    task = world.submit()
    world.place(task)
    world.apply(transition, task, S.STARTING, "starting")
    world.apply(start_failed, task, "node n-test died", False)
    got = world.get(task.id)
    assert got.state == S.QUEUED and got.attempt == 0 and world.allocations() == []
    world.place(got)
    world.apply(transition, got, S.STARTING, "starting")
    world.apply(start_failed, got, "workdir /proc/x: permission denied", True)
    assert world.get(task.id).state == S.FAILED and world.get(task.id).attempt == 1


def test_a_gang_member_that_fails_with_a_retry_restarts_the_running_gang(world):
    gang = {"name": "ddp", "size": 2}
    a = world.submit(gang=gang, retry={"attempts": 2})
    b = world.submit(gang=gang)
    world.run(a)
    world.run(b, pid=4343)
    world.end(a, FAILED)
    assert world.get(a.id).state == S.QUEUED
    assert world.get(b.id).state == S.PREEMPTED  # stopped, to run again with a
    assert "gang member" in world.get(b.id).state_reason


def test_a_cancelled_gang_member_cancels_the_others(world):
    gang = {"name": "ddp", "size": 3}
    a, b, c = (world.submit(gang=gang) for _ in range(3))
    world.run(a)
    world.run(b, pid=4343)
    world.apply(request_cancel, a, "alice")
    world.end(world.get(a.id), Exit(None, "stopped on request", stopped=True))
    assert world.get(a.id).state == S.CANCELLED
    assert world.get(b.id).state == S.CANCELLING  # its process is stopped next
    assert world.get(c.id).state == S.CANCELLED  # never started: at once
    assert "gang member" in world.get(c.id).state_reason


def test_an_illegal_transition_is_refused_and_writes_nothing(world):
    task = world.submit()
    with pytest.raises(IllegalTransition, match="from queued to running"):
        world.apply(transition, task, S.RUNNING, "skip ahead")
    assert world.get(task.id).state == S.QUEUED


# -- nodes -----------------------------------------------------------------------------


def test_drain_moves_running_services_and_lets_jobs_finish(world):
    job, service = world.submit(), world.submit(kind="service")
    world.run(job)
    world.run(service, pid=4343)
    node = world.node()
    world.apply(operator_sets, node, N.DRAINING, "admin")
    assert world.get(service.id).state == S.PREEMPTED
    assert "draining" in world.get(service.id).state_reason
    assert world.get(job.id).state == S.RUNNING


def test_a_node_is_removed_only_when_nothing_runs_there(world):
    job = world.submit()
    world.run(job)
    node = world.node()
    world.apply(operator_sets, node, N.DRAINING, "admin")
    with pytest.raises(Refused, match="still runs"):
        world.apply(operator_sets, world.node(), N.REMOVED, "admin")
    world.end(job, Exit(0, "exited with code 0"))
    world.apply(operator_sets, world.node(), N.REMOVED, "admin")
    assert world.node().status == N.REMOVED
    with world.store.read() as r:
        assert r.nodes.list() == []  # listed only when asked
    world.apply(node_seen, node_record())  # it registers again
    assert world.node().status == N.READY


def test_a_drained_node_that_dies_comes_back_draining(world):
    world.apply(operator_sets, world.node(), N.DRAINING, "admin")
    assert world.apply(node_lost, NODE, "no heartbeat")
    assert world.node().status == N.UNREACHABLE and world.node().prior_status == N.DRAINING
    assert not world.apply(node_lost, NODE, "no heartbeat")  # not news twice
    world.apply(node_seen, node_record())
    back = world.node()
    assert back.status == N.DRAINING and back.prior_status is None
    with world.store.read() as r:
        history = [(e.from_state, e.to_state) for e in r.nodes.events(NODE)]
    assert history == [
        (None, "ready"), ("ready", "draining"), ("draining", "unreachable"),
        ("unreachable", "draining"),
    ]  # fmt: skip


def test_an_unreachable_node_cannot_be_resumed(world):
    world.apply(node_lost, NODE, "no heartbeat")
    with pytest.raises(Refused, match="unreachable"):
        world.apply(operator_sets, world.node(), N.READY, "admin")


def test_cordon_is_reachable_and_only_the_table_decides(world):
    world.apply(operator_sets, world.node(), N.CORDONED, "admin", "fan noise")
    node = world.node()
    assert node.status == N.CORDONED and node.status_reason == "cordoned by admin: fan noise"
    with pytest.raises(IllegalTransition):
        world.apply(node_lifecycle.node_transition, node, N.CORDONED, "again")
    world.apply(operator_sets, node, N.READY, "admin")
    assert world.node().status == N.READY and world.node().status_reason == ""


def test_listings_and_the_scheduler_agree_on_which_gpus_are_usable(world):
    """Before, `gpu list` and `node list` showed a GPU without a fresh proof as usable
    while the scheduler refused it."""
    usability = Usability(proof_max_age_s=3600)
    world.apply(node_lifecycle.gpu_cordon, f"GPU-{NODE}-1", "by admin: flaky")
    with world.store.read() as r:
        nodes = r.nodes.list()
    snapshot = build_snapshot(nodes, [], usability)
    scheduler = {g.uuid: g.unusable_reason for g in snapshot.nodes[0].gpus}
    listed = {g["uuid"]: g["unusable_reason"] for g in gpu_views(nodes, [], usability)}
    shown = {g["uuid"]: g["reason"] for g in node_view(nodes[0], usability)["unusable_gpus"]}
    assert scheduler == listed == shown
    assert "no proof of GPU yet" in scheduler[f"GPU-{NODE}-0"]
    assert "GPU cordoned: by admin: flaky" in scheduler[f"GPU-{NODE}-1"]
