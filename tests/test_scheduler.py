"""The placement library: filters, scores, GPU choice and the reasons it gives."""

import copy

import numpy as np
import pytest

from gpuprovider.domain.resources import GpuRequest, parse_gpu_request
from gpuprovider.scheduler import (
    POLICIES,
    Framework,
    GpuView,
    NodeView,
    Placement,
    Preemption,
    RunningTask,
    Snapshot,
    TaskRequest,
    Unplaced,
    policy,
)
from gpuprovider.scheduler.fragmentation import TaskShape, TypicalTasks
from gpuprovider.scheduler.framework import Context, Filter, Policy
from gpuprovider.scheduler.state import ALL, ClusterState


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


# -- fragmentation and FGD ------------------------------------------------------------


def share(task_id, milli, cpu=0):
    return TaskRequest(task_id, GpuRequest(share_milli=milli), cpu_milli=cpu)


def whole(task_id, count, cpu=0, models=None):
    return TaskRequest(task_id, GpuRequest(count=count, models=models), cpu_milli=cpu)


def gpu_node(name, used, model="G2", cpus=96, memory_mib=1 << 20):
    gpus = [GpuView(f"{name}-{j}", j, model, 16, used_milli=u) for j, u in enumerate(used)]
    return NodeView(name, name, cpus * 1000, memory_mib, gpus)


def node_frag(typical, state):
    bound = typical.bind(state)
    return bound.node_frag(state.gpu_free, state.cpu_free, state.mem_free, state.node_model)


def test_node_fragmentation_follows_the_papers_definition():
    # Typical tasks: half want 0.5 GPU, half want a whole GPU.
    typical = TypicalTasks({TaskShape(0, 500, 1, None): 1, TaskShape(0, 1000, 1, None): 1})
    state = ClusterState(
        [
            gpu_node("a", [700, 0]),
            gpu_node("b", [1000, 1000]),
            gpu_node("c", [700, 700], model="T4"),
        ]
    )
    frag = node_frag(typical, state)
    # a: 300 free on GPU0 is too little for either shape; GPU1 serves both.
    # b: nothing free, nothing fragmented. c: 300+300 free, neither shape fits anywhere.
    assert frag.tolist() == [300.0, 0.0, 600.0]
    only_g2 = TypicalTasks({TaskShape(0, 500, 1, frozenset({"G2"})): 1})
    assert node_frag(only_g2, state).tolist() == [300.0, 0.0, 600.0]  # c's model: no access


def test_fragmentation_with_memory_counts_gpus_stranded_without_memory():
    state = ClusterState([gpu_node("roomy", [0, 0]), gpu_node("short", [0, 0], memory_mib=8192)])
    paper = TypicalTasks({TaskShape(0, 1000, 1, None): 1})
    with_memory = TypicalTasks({TaskShape(0, 1000, 1, None, memory=16384): 1})
    assert node_frag(paper, state).tolist() == [0.0, 0.0]
    # "short" has two whole GPUs but not the memory to run the typical task beside them
    assert node_frag(with_memory, state).tolist() == [0.0, 2000.0]


def test_typical_tasks_keep_the_common_shapes_covering_95_percent():
    tasks = [share(f"s{i}", 500) for i in range(90)] + [whole(f"w{i}", 1) for i in range(6)]
    tasks += [whole(f"r{i}", 8) for i in range(4)]
    typical = TypicalTasks.from_tasks(tasks)
    assert [s.milli for s in typical.shapes] == [500, 1000]
    assert typical.freq.round(4).tolist() == [0.9375, 0.0625]


def test_fgd_puts_a_share_where_it_closes_a_gap():
    typical = TypicalTasks.from_tasks([share("x", 500), whole("y", 1)])
    snap = Snapshot([gpu_node("fresh", [0] * 8), gpu_node("partly", [500] + [0] * 7)])
    decision = Framework(policy("fgd"), typical=typical).place_one(snap, share("t", 500))
    assert decision.node_id == "partly" and decision.gpu_uuids == ("partly-0",)
    spread = Framework(policy("spread")).place_one(
        Snapshot([gpu_node("fresh", [0] * 8), gpu_node("partly", [500] + [0] * 7)]), share("t", 500)
    )
    assert spread.node_id == "fresh"


def test_fgd_warm_breaks_fgd_ties_for_a_node_in_use():
    # A whole GPU changes no node's fragmentation here, so FGD scores both nodes
    # equally and takes the first; fgd-warm takes the node in use, keeping one whole.
    typical = TypicalTasks.from_tasks([whole("y", 1)])

    def snap():
        return Snapshot([gpu_node("empty", [0] * 8), gpu_node("busy", [1000] * 2 + [0] * 6)])

    assert (
        Framework(policy("fgd"), typical=typical).place_one(snap(), whole("t", 1)).node_id
        == "empty"
    )
    assert (
        Framework(policy("fgd-warm"), typical=typical).place_one(snap(), whole("t", 1)).node_id
        == "busy"
    )


def test_fgd_full_plans_for_the_rare_shapes_too():
    # 19 shares and one 2-GPU task: at 95 % coverage the 2-GPU shape is not typical, so a
    # whole GPU grows no fragmentation anywhere and goes to the first node; planning for
    # every shape, fgd-full keeps two GPUs free together for the 2-GPU task.
    seen = [share(f"s{i}", 500) for i in range(19)] + [whole("pair", 2)]

    def placed_by(name):
        chosen = policy(name)
        snap = Snapshot([gpu_node("two", [0] * 2), gpu_node("three", [0] * 3)])
        framework = Framework(chosen, typical=chosen.typical_tasks(seen))
        return framework.place_one(snap, whole("t", 1)).node_id

    assert [s.count for s in policy("fgd-full").typical_tasks(seen).shapes] == [1, 2]
    assert placed_by("fgd") == placed_by("fgd-warm") == "two"
    assert placed_by("fgd-full") == "three"


def test_fgd_full_keeps_memory_beside_free_gpus():
    # The typical task wants a GPU and 32 GiB; a CPU-only task wanting 40 GiB fits on
    # either node. FGD reads no memory and takes the first node, which leaves its two
    # GPUs without the memory to use them; fgd-full takes the node with memory to spare.
    gpu_task = TaskRequest("g", GpuRequest(count=1), memory_mib=32768)
    seen = [gpu_task] * 9 + [TaskRequest("c", GpuRequest(), memory_mib=40960)]

    def placed_by(name):
        chosen = policy(name)
        snap = Snapshot([gpu_node("small", [0, 0], memory_mib=65536), gpu_node("big", [0, 0])])
        framework = Framework(chosen, typical=chosen.typical_tasks(seen))
        return framework.place_one(snap, seen[-1]).node_id

    assert placed_by("fgd") == "small"
    assert placed_by("fgd-full") == "big"


def test_fgd_without_typical_tasks_plans_for_the_queue():
    placed = Framework(policy("fgd")).place(
        Snapshot([gpu_node("a", [0, 0])]), [share("1", 300), share("2", 300)]
    )
    assert all(isinstance(p, Placement) for p in placed)
    assert placed[0].gpu_uuids == placed[1].gpu_uuids  # packed onto one GPU


def test_model_sets_and_cluster_state_bookkeeping():
    nodes = [gpu_node("v16", [0, 0], model="V100M16"), gpu_node("t4", [0, 0], model="T4")]
    state = ClusterState(nodes)
    fw = Framework(policy("first-fit"))
    d = fw.decide(state, whole("t", 2, models=frozenset({"T4", "V100M32"})))
    assert d.node_id == "t4"
    assert state.allocated_milli == 2000 and state.capacity_milli == 4000
    assert isinstance(fw.decide(state, whole("u", 1, models=frozenset({"T4"}))), Unplaced)


def test_every_policy_places_through_the_same_pipeline():
    for name in POLICIES:
        snap = Snapshot([gpu_node("a", [0, 0]), gpu_node("b", [500, 0])])
        decisions = Framework(policy(name)).place(snap, [share("s", 500), whole("w", 1, cpu=1000)])
        assert all(isinstance(d, Placement) for d in decisions), name
        too_big = Framework(policy(name)).place_one(snap, whole("x", 3))
        assert isinstance(too_big, Unplaced) and "no node has 3 GPU free" in too_big.reason


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_an_empty_cluster_leaves_every_task_queued_with_the_reason(name):
    decisions = Framework(policy(name)).place(Snapshot([]), [req("t", "1"), req("c")])
    assert [d.reason for d in decisions] == ["no node is registered yet"] * 2


def look_afresh(framework, state, request):
    """The pipeline's plain definition, as an oracle: filter and score every node, take
    the first of the best, let the scorer's or the picker's GPUs stand, reserve."""
    task = state.compile(request)
    fitting = state.fitting_gpus(task)
    ok = np.ones(len(state), dtype=bool)
    for check in framework.policy.filters:
        ok &= check.check(state, task, ALL, fitting)
    candidates = np.nonzero(ok)[0]
    if not len(candidates):
        return None
    context = Context(state, task, framework)
    scores = framework.policy.scorer(context, candidates)
    pos = int(np.argmax(scores.values))
    node = int(candidates[pos])
    if scores.share_gpu is not None:
        gpus = [int(scores.share_gpu[pos])]
    else:
        gpus = framework.policy.pick_gpus(context, node)
    state.reserve(node, gpus, task.milli, task.cpu, task.memory)
    return state.nodes[node].id, tuple(state.nodes[node].gpus[j].uuid for j in gpus)


@pytest.mark.parametrize("name", ["best-fit", "fgd", "fgd-warm", "fgd-full", "spread"])
def test_kept_verdicts_and_scores_decide_as_scoring_every_node_would(name):
    # The framework redoes only nodes changed since a task shape was last placed, and
    # scores nodes in equal states once; a plain look at every node must agree.
    rng = np.random.default_rng(5)
    models = ["h100-80gb-sxm", "rtx-4090-24gb", "a10-24gb"]
    nodes = [node(f"n{i}", [models[i % 3]] * (8 if i % 2 else 4), cpus=32) for i in range(60)]
    nodes[3].labels = {"zone": "b"}
    shapes = ["0.25", "0.5", "1", "2", "H100:1", "24GB..:1", "0"]
    tasks = [
        req(
            f"t{k}",
            shapes[int(rng.integers(len(shapes)))],
            cpu=int(rng.choice([1000, 2000, 4000])),
            node_selector=(("zone", "b"),) if k % 17 == 0 else (),
        )
        for k in range(400)
    ]
    chosen = POLICIES[name]
    typical = chosen.typical_tasks(tasks)
    kept, plain = ClusterState(nodes), ClusterState(copy.deepcopy(nodes))
    keeping, oracle = Framework(chosen, typical=typical), Framework(chosen, typical=typical)
    outcomes = set()
    for task in tasks:
        decision = keeping.decide(kept, task)
        expected = look_afresh(oracle, plain, task)
        if expected is None:
            assert isinstance(decision, Unplaced)
        else:
            assert (decision.node_id, decision.gpu_uuids) == expected
        outcomes.add(type(decision))
    assert outcomes == {Placement, Unplaced}  # it filled up: both outcomes were compared


# -- gangs and preemption -----------------------------------------------------------


def member(task_id, gang, size, count=1):
    return TaskRequest(task_id, GpuRequest(count=count), gang=gang, gang_size=size)


def test_gang_is_placed_all_or_nothing():
    snap = Snapshot([gpu_node("a", [0, 0]), gpu_node("b", [0, 0])])
    fw = Framework(policy("best-fit"))
    fits = fw.place(snap, [member("w0", "job", 3), member("w1", "job", 3), member("w2", "job", 3)])
    assert all(isinstance(d, Placement) for d in fits)
    snap = Snapshot([gpu_node("a", [0, 0]), gpu_node("b", [0, 0])])
    too_big = fw.place(
        snap, [member(f"x{i}", "big", 3, count=2) for i in range(3)] + [whole("solo", 2)]
    )
    assert all(isinstance(d, Unplaced) and "does not fit at once" in d.reason for d in too_big[:3])
    assert isinstance(too_big[3], Placement)  # nothing of the gang was left reserved


def test_incomplete_gang_waits_for_its_members():
    snap = Snapshot([gpu_node("a", [0, 0])])
    decisions = Framework(policy("best-fit")).place(snap, [member("w0", "g", 2)])
    assert decisions[0].reason == "gang g: 1 of its 2 members queued; waiting for the rest"


def running(task_id, node, slots, priority, started_at, preemptible=True, gang=None):
    return RunningTask(
        task_id,
        node,
        tuple(f"{node}-{j}" for j in slots),
        1000,
        0,
        0,
        priority,
        preemptible,
        started_at,
        gang,
    )


def busy_snapshot(jobs):
    used = {}
    for job in jobs:
        for uuid in job.gpu_uuids:
            used[uuid] = 1000
    nodes = [gpu_node(n, [used.get(f"{n}-{j}", 0) for j in range(2)]) for n in ("a", "b")]
    return Snapshot(nodes, running=list(jobs))


def test_preemption_picks_the_victims_that_lose_the_least():
    jobs = [
        running("old-a", "a", [0], priority=0, started_at=100),
        running("new-a", "a", [1], priority=0, started_at=900),
        running("low-b", "b", [0], priority=-5, started_at=500),
        running("keep-b", "b", [1], priority=0, started_at=950, preemptible=False),
    ]
    urgent = TaskRequest("urgent", GpuRequest(count=1), priority=10)
    decision = Framework(policy("best-fit")).place_one(busy_snapshot(jobs), urgent)
    # one victim suffices anywhere; the lowest priority one goes
    assert isinstance(decision, Preemption) and decision.victims == ("low-b",)
    two = TaskRequest("two", GpuRequest(count=2), priority=10)
    decision = Framework(policy("best-fit")).place_one(busy_snapshot(jobs), two)
    assert decision.node_id == "a" and set(decision.victims) == {"old-a", "new-a"}


@pytest.mark.parametrize(
    "holder",
    [
        running("peer", "a", [0, 1], priority=10, started_at=1),  # equal priority
        running("kept", "a", [0, 1], priority=0, started_at=1, preemptible=False),
    ],
)
def test_no_preemption_of_equal_priority_or_protected_work(holder):
    snap = busy_snapshot([holder])
    snap.nodes = snap.nodes[:1]
    task = TaskRequest("t", GpuRequest(count=1), priority=10)
    assert isinstance(Framework(policy("best-fit")).place_one(snap, task), Unplaced)


def test_a_gang_is_evicted_whole_and_counts_as_all_its_members():
    jobs = [
        # a two-worker gang, one worker per node, started last: alone it would lose least
        running("ddp-0", "a", [0], priority=0, started_at=900, gang="ddp"),
        running("ddp-1", "b", [0], priority=0, started_at=900, gang="ddp"),
        running("solo", "b", [1], priority=0, started_at=100),
        running("owner", "a", [1], priority=0, started_at=1, preemptible=False),
    ]
    urgent = TaskRequest("urgent", GpuRequest(count=1), priority=10)
    decision = Framework(policy("best-fit")).place_one(busy_snapshot(jobs), urgent)
    # evicting one worker stops the whole gang (two tasks): the single task goes instead
    assert isinstance(decision, Preemption) and decision.victims == ("solo",)
    jobs[2] = running("solo", "b", [1], priority=0, started_at=100, preemptible=False)
    decision = Framework(policy("best-fit")).place_one(busy_snapshot(jobs), urgent)
    assert set(decision.victims) == {"ddp-0", "ddp-1"}  # never half a gang
    jobs[0] = running("ddp-0", "a", [0], priority=0, started_at=900, gang="ddp", preemptible=False)
    decision = Framework(policy("best-fit")).place_one(busy_snapshot(jobs), urgent)
    assert isinstance(decision, Unplaced)  # one protected member protects the gang


def test_a_gang_preempts_as_a_whole_or_not_at_all():
    jobs = [
        running("low-a", "a", [1], priority=0, started_at=1),
        running("low-b", "b", [1], priority=0, started_at=1),
        running("kept-b", "b", [0], priority=0, started_at=1, preemptible=False),
    ]
    gang = [
        TaskRequest(f"w{i}", GpuRequest(count=1), priority=10, gang="g", gang_size=3)
        for i in range(3)
    ]
    # a-0 is free; one more GPU comes from evicting low-a or low-b, a third from the other
    decisions = Framework(policy("best-fit")).place(busy_snapshot(jobs), gang)
    assert all(isinstance(d, Preemption) for d in decisions)  # nobody starts alone
    assert sorted(v for d in decisions for v in d.victims) == ["low-a", "low-b"]  # once each
    assert all("gang g waits for low-a, low-b" in d.reason for d in decisions)
    assert len({(d.node_id, d.task_id) for d in decisions}) == 3
    # four workers cannot fit even with every eviction: nothing is evicted at all
    big = [
        TaskRequest(f"x{i}", GpuRequest(count=1), priority=10, gang="big", gang_size=4)
        for i in range(4)
    ]
    decisions = Framework(policy("best-fit")).place(
        busy_snapshot(jobs), [*big, TaskRequest("later", GpuRequest(count=2), priority=10)]
    )
    assert all(
        isinstance(d, Unplaced) and "does not fit at once" in d.reason for d in decisions[:4]
    )
    # what the gang let go of still runs: the next task must evict it again
    assert isinstance(decisions[4], Preemption) and decisions[4].victims == ("low-a",)


def test_one_pass_never_evicts_the_same_victim_twice():
    jobs = [running("v", "a", [0], priority=0, started_at=1)]
    snap = busy_snapshot(jobs)
    snap.nodes = [gpu_node("a", [1000, 1000])]
    first, second = Framework(policy("best-fit")).place(
        snap,
        [
            TaskRequest("p1", GpuRequest(count=1), priority=5),
            TaskRequest("p2", GpuRequest(count=1), priority=5),
        ],
    )
    assert isinstance(first, Preemption) and first.victims == ("v",)
    assert isinstance(second, Unplaced)


def vip_only(signs):
    """A filter that reads a field the default filters do not: priority (nodes labelled
    vip take only work of priority > 0)."""

    def check(state, task, rows, fitting):
        nodes = [state.nodes[i] for i in np.arange(len(state))[rows]]
        return np.array([n.labels.get("vip") != "1" or task.request.priority > 0 for n in nodes])

    return Filter(
        "vip", check, lambda s, t, failed: {"node takes priority work only": len(failed)}, signs
    )


@pytest.mark.parametrize(
    "signs", [lambda t: t.request.priority > 0, lambda t: None], ids=["signs", "cannot-sign"]
)
def test_a_filter_reading_another_field_never_gets_a_stale_verdict(signs):
    """Kept verdicts were keyed by a fixed list of fields: a new filter reading another
    one got another task's verdict. Each filter now signs what it reads (or keeps
    nothing, when it cannot)."""
    base = policy("first-fit")
    custom = Policy(base.name, base.scorer, base.pick_gpus, (*base.filters, vip_only(signs)))
    snap = Snapshot(
        [node("vip", ["h100-80gb-sxm"] * 4, labels={"vip": "1"}), node("plain", ["h100-80gb-sxm"])]
    )
    # `free` finds the vip node closed to it; nothing changes there before `paid` looks
    free, paid = Framework(custom).place(
        snap, [req("free", "1", priority=0), req("paid", "1", priority=5)]
    )
    assert isinstance(free, Placement) and free.node_id == "plain"
    assert isinstance(paid, Placement) and paid.node_id == "vip"
    compiled = ClusterState(snap.nodes).compile(req("x", "1"))
    assert (custom.shape_key(compiled) is None) == (signs(compiled) is None)


def test_a_pool_holds_its_per_node_limit_and_the_next_node_takes_the_rest():
    """A pipeline stage's pool (pipelines/): at most `per_node` of it on one node, work
    already there counted; a task of no pool is never held by it."""
    first = node("a", ["h100-80gb-sxm"] * 4)
    first.pools["t/pc2"] = 1  # one running there already
    snap = Snapshot([first, node("b", ["h100-80gb-sxm"] * 4)])
    pool = ("t/pc2", 2)
    decisions = Framework(policy("first-fit")).place(
        snap,
        [
            TaskRequest("p1", parse_gpu_request("1"), pool=pool),
            TaskRequest("p2", parse_gpu_request("1"), pool=pool),
            TaskRequest("p3", parse_gpu_request("1"), pool=pool),
            TaskRequest("p4", parse_gpu_request("1"), pool=pool),
            TaskRequest("free", parse_gpu_request("1")),
        ],
    )
    where = {d.task_id: getattr(d, "node_id", None) for d in decisions}
    assert where == {"p1": "a", "p2": "b", "p3": "b", "p4": None, "free": "a"}
    assert "pool pc2 is at its limit (2 per node)" in decisions[3].reason


def test_a_pinned_task_goes_to_its_node_only():
    """A pipeline stage whose work store is a folder of one node runs there or waits."""
    snap = Snapshot([node("a", ["h100-80gb-sxm"]), node("b", ["h100-80gb-sxm"] * 2)])
    decisions = Framework(policy("best-fit")).place(
        snap,
        [
            TaskRequest("there", parse_gpu_request("1"), node_id="b"),
            TaskRequest("again", parse_gpu_request("1"), node_id="b"),
            TaskRequest("full", parse_gpu_request("1"), node_id="b"),
        ],
    )
    assert [getattr(d, "node_id", None) for d in decisions] == ["b", "b", None]
