"""The placement library: filters, scores, GPU choice and the reasons it gives."""

import pytest

from gpuprovider.domain.resources import parse_gpu_request
from gpuprovider.scheduler import (
    Framework,
    GpuView,
    NodeView,
    Placement,
    Snapshot,
    TaskRequest,
    Unplaced,
    policy,
)


def node(name, models, cpus=8, **kw):
    gpus = [
        GpuView(f"{name}-{i}", i, m, 80 if m.startswith("h100") else 24)
        for i, m in enumerate(models)
    ]
    return NodeView(name, name, cpus * 1000, 65536, gpus, **kw)


def req(task_id, gpu="0", cpu=0, **kw):
    return TaskRequest(task_id, parse_gpu_request(gpu), cpu_milli=cpu, **kw)


def test_model_constraint_picks_the_right_node():
    snap = Snapshot([node("a", ["rtx-4090-24gb"] * 2), node("b", ["h100-80gb-sxm"] * 2)])
    decision = Framework(policy("best-fit")).place_one(snap, req("t", "H100:2"))
    assert isinstance(decision, Placement) and decision.node_id == "b"
    assert decision.gpu_uuids == ("b-0", "b-1") and decision.gpu_milli == 1000


def test_unplaceable_says_why_per_task():
    snap = Snapshot([node("a", ["h100-80gb-sxm"])])
    decision = Framework(policy("best-fit")).place_one(snap, req("t", "H100:2"))
    assert isinstance(decision, Unplaced)
    assert decision.reason == "no node has 2 H100 free (at most 1 on one node)"
    cpu_short = Framework(policy("best-fit")).place_one(snap, req("c", cpu=64000))
    assert "not enough free CPU" in cpu_short.reason


def test_reservations_are_seen_by_the_next_task():
    snap = Snapshot([node("a", ["h100-80gb-sxm"] * 2)])
    first, second, third = Framework(policy("best-fit")).place(
        snap, [req("1", "1"), req("2", "1"), req("3", "1")]
    )
    assert {first.gpu_uuids, second.gpu_uuids} == {("a-0",), ("a-1",)}
    assert isinstance(third, Unplaced)


def test_fractions_pack_onto_one_gpu_and_keep_others_whole():
    snap = Snapshot([node("a", ["h100-80gb-sxm"] * 2)])
    fw = Framework(policy("best-fit"))
    halves = fw.place(snap, [req("1", "0.5"), req("2", "0.25"), req("3", "0.25")])
    assert {d.gpu_uuids for d in halves} == {("a-0",)}
    whole = fw.place_one(snap, req("4", "1"))
    assert whole.gpu_uuids == ("a-1",)
    assert isinstance(fw.place_one(snap, req("5", "0.1")), Unplaced)


def test_spread_and_best_fit_differ():
    def snap():
        busy = node("busy", ["h100-80gb-sxm"] * 2)
        busy.gpus[0].used_milli = 1000
        return Snapshot([node("idle", ["h100-80gb-sxm"] * 2), busy])

    assert Framework(policy("best-fit")).place_one(snap(), req("t", "1")).node_id == "busy"
    assert Framework(policy("spread")).place_one(snap(), req("t", "1")).node_id == "idle"
    assert Framework(policy("first-fit")).place_one(snap(), req("t", "1")).node_id == "idle"


def test_unusable_nodes_and_gpus_are_skipped_with_their_reason():
    cordoned = node("a", ["h100-80gb-sxm"], unusable_reason="node is cordoned")
    decision = Framework(policy("best-fit")).place_one(Snapshot([cordoned]), req("t", "1"))
    assert decision.reason == "a: node is cordoned"
    sick = node("b", ["h100-80gb-sxm"] * 2)
    sick.gpus[0].unusable_reason = "ECC errors"
    assert Framework(policy("best-fit")).place_one(Snapshot([sick]), req("t", "1")).gpu_uuids == (
        "b-1",
    )


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="unknown scheduler policy 'fastest'"):
        policy("fastest")
