"""Placement policies in a running daemon: shared GPUs, preemption, gangs, quotas."""

import sys

import httpx
import pytest

from gpuprovider.testing import Provider, free_port, kill_task_processes, make_home, wait_for

PY = sys.executable
SLEEP = [PY, "-c", "import time; time.sleep(120)"]
SHARE = [
    PY,
    "-c",
    "import os, time; print(os.environ['CUDA_VISIBLE_DEVICES'], "
    "os.environ['GPUPROVIDER_GPU_SHARE'], flush=True); time.sleep(120)",
]


def one_gpu(extra: str = "") -> str:
    return f'\n[[inventory.simulated_gpus]]\nmodel = "a100-80gb-sxm"\ncount = 1\n{extra}'


def two_gpus(extra: str = "") -> str:
    return f'\n[[inventory.simulated_gpus]]\nmodel = "a100-80gb-sxm"\ncount = 2\n{extra}'


@pytest.fixture
def start(tmp_path):
    started = []

    def run(gpus: str, policy: str = "best-fit") -> Provider:
        port = free_port()
        home = make_home(tmp_path / f"home{len(started)}", port, gpus)
        home.config.write_text(
            home.config.read_text().replace('policy = "best-fit"', f'policy = "{policy}"')
        )
        provider = Provider(home, port)
        provider.start()
        started.append(provider)
        return provider

    yield run
    for provider in started:
        provider.stop()
        kill_task_processes(provider.home)


def client(provider: Provider, tenant: str) -> httpx.Client:
    made = provider.api.post("/tokens", json={"name": tenant, "scopes": ["read", "submit"]})
    return httpx.Client(
        base_url=provider.url + "/api/v1",
        headers={"Authorization": f"Bearer {made.json()['token']}"},
    )


@pytest.mark.parametrize("policy", ["best-fit", "fgd-warm"])
def test_fractional_tasks_share_one_gpu(start, policy):
    p = start(two_gpus(), policy)
    a = p.submit(command=SHARE, resources={"gpu": 0.5})
    b = p.submit(command=SHARE, resources={"gpu": 0.5})
    for task in (a, b):
        p.wait_state(task["id"], "running")
    logs = [wait_for(lambda t=t: p.logs(t["id"]).strip()) for t in (a, b)]
    assert logs[0] == logs[1] and logs[0].endswith(" 0.5")  # same device, half each
    got = p.task(a["id"])
    assert got["allocation"]["gpu_share"] == 0.5
    gpus = {g["index"]: g for g in p.api.get("/gpus").json()}
    shared = gpus[int(logs[0].split()[0])]
    assert shared["used_share"] == 1.0 and sorted(shared["tasks"]) == sorted([a["id"], b["id"]])
    whole = p.submit(command=SLEEP, resources={"gpu": 1})
    p.wait_state(whole["id"], "running")  # the other GPU stayed whole for it


def test_paying_work_preempts_the_operators_own_work(start):
    p = start(one_gpu())
    own = p.submit(
        name="owner-mining", command=SLEEP, resources={"gpu": 1}, priority=-10, preemptible=True
    )
    p.wait_state("owner-mining", "running")
    p.submit(name="rental", command=[PY, "-c", "print('paid')"], resources={"gpu": 1}, priority=10)
    paid = p.wait_state("rental", "succeeded")
    assert paid["exit_code"] == 0
    evicted = p.task(own["id"])
    preempted = [e for e in evicted["events"] if e["to"] == "preempted"]
    assert preempted and preempted[0]["reason"].startswith("preempted by rental (priority 10)")
    requeued = [
        e for e in evicted["events"] if e["to"] == "queued" and "after preemption" in e["reason"]
    ]
    # the paid work started on the GPU the evicted work gave back, not beside it
    assert requeued and paid["started_at"] >= requeued[0]["at"]
    # the evicted work comes back once the GPU is free, without using up its attempts
    back = p.wait_state(own["id"], "running")
    assert back["attempt"] == 2


def test_a_preemption_by_another_tenant_does_not_name_its_task(start):
    p = start(one_gpu())
    mine = client(p, "team-a")
    theirs = client(p, "team-b")
    spec = {"command": SLEEP, "resources": {"gpu": 1}, "priority": -10, "preemptible": True}
    evicted = mine.post("/tasks", json=spec).json()
    p.wait_state(evicted["id"], "running")
    secret = {"name": "secret-project", "command": [PY, "-c", "pass"], "resources": {"gpu": 1}}
    theirs.post("/tasks", json=secret | {"priority": 10})
    seen = wait_for(
        lambda: [
            e
            for e in mine.get(f"/tasks/{evicted['id']}").json()["events"]
            if e["to"] == "preempted"
        ]
    )
    assert seen[0]["reason"].startswith("preempted by another tenant's task")
    assert "secret-project" not in seen[0]["reason"]


def test_equal_priority_or_protected_work_is_not_preempted(start):
    p = start(one_gpu())
    p.submit(name="steady", command=SLEEP, resources={"gpu": 1}, priority=0, preemptible=False)
    p.wait_state("steady", "running")
    p.submit(name="eager", command=["true"], resources={"gpu": 1}, priority=50)
    waiting = wait_for(lambda: (t := p.task("eager"))["reason"].startswith("no node") and t)
    assert waiting["state"] == "queued" and p.task("steady")["state"] == "running"


def test_gang_waits_for_all_members_and_ends_together(start):
    p = start(two_gpus())
    gang = {"name": "ddp", "size": 2}
    first = p.submit(name="rank0", command=SLEEP, resources={"gpu": 1}, gang=gang)
    queued = wait_for(lambda: (t := p.task("rank0"))["reason"].startswith("gang") and t)
    assert "1 of its 2 members queued" in queued["reason"]
    p.submit(name="rank1", command=SLEEP, resources={"gpu": 1}, gang=gang)
    p.wait_state("rank0", "running")
    p.wait_state("rank1", "running")
    p.api.post("/tasks/rank1/cancel")
    done = p.wait_state(first["id"], "cancelled")
    assert "gang member rank1 was cancelled" in [e["reason"] for e in done["events"]][-2:][0]


def test_a_gang_is_preempted_whole_and_comes_back_whole(start):
    p = start(two_gpus())
    gang = {"name": "mining", "size": 2}
    for rank in range(2):
        p.submit(
            name=f"mine{rank}",
            command=SLEEP,
            resources={"gpu": 1},
            gang=gang,
            priority=-10,
            preemptible=True,
        )
    for rank in range(2):
        p.wait_state(f"mine{rank}", "running")
    p.submit(name="rental", command=[PY, "-c", "print('paid')"], resources={"gpu": 1}, priority=10)
    assert p.wait_state("rental", "succeeded")["exit_code"] == 0
    for rank in range(2):  # both workers stopped, though the rental needed one GPU
        back = p.wait_state(f"mine{rank}", "running")
        reasons = [e["reason"] for e in back["events"] if e["to"] == "preempted"]
        assert reasons and reasons[0].startswith("preempted by rental (priority 10)")
        assert back["attempt"] == 2


def test_a_gang_preempts_lower_priority_work_for_all_its_members(start):
    p = start(two_gpus())
    for name in ("low0", "low1"):
        p.submit(name=name, command=SLEEP, resources={"gpu": 1}, priority=-5, preemptible=True)
        p.wait_state(name, "running")
    gang = {"name": "train", "size": 2}
    for rank in range(2):
        p.submit(name=f"rank{rank}", command=["true"], resources={"gpu": 1}, gang=gang, priority=5)
    for rank in range(2):
        p.wait_state(f"rank{rank}", "succeeded")
    for name in ("low0", "low1"):
        evicted = p.task(name)
        assert any(
            e["to"] == "preempted" and e["reason"].startswith("preempted by rank")
            for e in evicted["events"]
        )


def test_gang_too_big_for_the_cluster_stays_queued_with_the_reason(start):
    p = start(two_gpus())
    gang = {"name": "huge", "size": 3}
    for i in range(3):
        p.submit(name=f"w{i}", command=["true"], resources={"gpu": 1}, gang=gang)
    waiting = wait_for(lambda: "does not fit at once" in (t := p.task("w0"))["reason"] and t)
    assert waiting["state"] == "queued"
    assert p.task("w2")["state"] == "queued"


def test_work_beyond_quota_is_preemptible_and_gives_way(start):
    p = start(two_gpus("\n[quotas.team-a]\ngpus = 1\n"))
    team_a, team_b = client(p, "team-a"), client(p, "team-b")
    a1 = team_a.post("/tasks", json={"command": SLEEP, "resources": {"gpu": 1}}).json()
    a2 = team_a.post("/tasks", json={"command": SLEEP, "resources": {"gpu": 1}}).json()
    p.wait_state(a1["id"], "running")
    p.wait_state(a2["id"], "running")
    over = [
        t
        for t in (p.task(a1["id"]), p.task(a2["id"]))
        if any("quota" in e["reason"] for e in t["events"])
    ]
    assert len(over) == 1  # the second GPU runs beyond team-a's quota of 1
    b = team_b.post("/tasks", json={"command": SLEEP, "resources": {"gpu": 1}}).json()
    p.wait_state(b["id"], "running")  # guaranteed work of the same priority evicts it
    evicted = p.task(over[0]["id"])
    assert any(e["to"] == "preempted" for e in evicted["events"])


def test_unknown_policy_in_config_is_refused(tmp_path):
    port = free_port()
    home = make_home(tmp_path / "h", port)
    home.config.write_text(
        home.config.read_text().replace('policy = "best-fit"', 'policy = "fastest"')
    )
    done = Provider(home, port).cli("up", timeout=60)
    assert done.returncode == 2 and "[scheduler] policy: 'fastest' is not one of" in done.stderr
    assert "best-fit" in done.stderr


def test_node_selector_and_gang_size_conflicts(start):
    p = start(two_gpus())
    home_cfg = p.home.config.read_text()
    assert "labels = {}" in home_cfg
    picky = p.submit(command=["true"], node_selector={"zone": "eu"})
    waiting = wait_for(lambda: "label" in (t := p.task(picky["id"]))["reason"] and t)
    assert waiting["state"] == "queued" and "label zone=eu not set" in waiting["reason"]
    gang = {"name": "g", "size": 2}
    p.submit(command=SLEEP, gang=gang)
    clash = p.api.post("/tasks", json={"command": ["true"], "gang": {"name": "g", "size": 3}})
    assert clash.status_code == 409 and "already has members of size 2" in clash.json()["error"]
