"""Draining and removing a node: jobs finish, services move, nothing is lost."""

import sys

from gpuprovider.testing import wait_for

PY = sys.executable


def test_drain_then_remove(fresh_provider):
    p = fresh_provider
    p.start()
    node = p.api.get("/nodes").json()[0]["name"]
    go = p.home.root / "finish-now"  # the job runs until the test lets it finish
    wait = f"import os, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.05)"
    job = p.submit(name="finishing", command=[PY, "-c", wait])
    service = p.submit(
        name="web", kind="service", command=[PY, "-c", "import time; time.sleep(300)"]
    )
    p.wait_state(job["id"], "running")
    p.wait_state(service["id"], "running")
    drained = p.cli("node", "drain", node)
    assert drained.returncode == 0, drained.stderr
    assert "services moving elsewhere: web" in drained.stdout and "finishing" in drained.stdout
    moved = p.wait_state(service["id"], "queued")  # no other node: it waits, saying why
    assert moved["preemptions"] == 1 and moved["attempt"] == 1
    assert any("draining" in e["reason"] for e in p.task(service["id"])["events"])
    refused = p.cli("node", "remove", node)
    assert refused.returncode == 2 and "still runs finishing" in refused.stderr
    go.touch()
    p.wait_state(job["id"], "succeeded")
    assert p.api.get("/nodes").json()[0]["status"] == "draining"
    fresh = p.submit(name="waits", command=["true"])
    waiting = p.task(fresh["id"])
    assert waiting["state"] == "queued"
    p.cli("task", "cancel", "web")
    p.cli("task", "cancel", "waits")
    removed = p.cli("node", "remove", node)
    assert removed.returncode == 0 and "removed" in removed.stdout


def test_bad_node_commands_name_the_problem(provider):
    node = provider.api.get("/nodes").json()[0]["name"]
    unknown = provider.cli("node", "drain", "no-such-node")
    assert unknown.returncode == 2 and f"no node 'no-such-node'; nodes: {node}" in unknown.stderr
    busy = provider.cli("node", "remove", node)
    assert busy.returncode == 2 and "drain node" in busy.stderr


def test_cordon_keeps_new_work_off_until_uncordoned(fresh_provider):
    p = fresh_provider
    p.start()
    node = p.api.get("/nodes").json()[0]["name"]
    done = p.cli("node", "cordon", node, "--reason", "fan replaced tomorrow")
    assert done.returncode == 0, done.stderr
    listed = p.cli("node", "list")
    assert "cordoned" in listed.stdout and "fan replaced tomorrow" in listed.stdout
    task = p.submit(name="waits", command=["true"])
    waiting = wait_for(lambda: "cordoned" in (t := p.task(task["id"]))["reason"] and t)
    assert waiting["state"] == "queued" and "fan replaced tomorrow" in waiting["reason"]
    assert p.cli("node", "uncordon", node).returncode == 0
    p.wait_state(task["id"], "succeeded")
    history = [(e["from"], e["to"]) for e in p.api.get(f"/nodes/{node}").json()["events"]]
    assert history[-2:] == [("ready", "cordoned"), ("cordoned", "ready")]


def test_a_cordoned_gpu_gets_no_new_work_and_says_why(fresh_provider):
    p = fresh_provider
    p.start()
    h100s = [g for g in p.api.get("/gpus").json() if g["model"] == "h100-80gb-sxm"]
    for gpu in h100s:
        assert p.cli("gpu", "cordon", gpu["uuid"], "--reason", "XID 79").returncode == 0
    assert "GPU cordoned: by admin: XID 79" in p.cli("gpu", "list").stdout
    task = p.submit(name="h100-job", command=["true"], resources={"gpu": "H100:1"})
    waiting = wait_for(lambda: "XID 79" in (t := p.task(task["id"]))["reason"] and t)
    assert waiting["state"] == "queued"
    assert p.cli("gpu", "uncordon", h100s[0]["uuid"]).returncode == 0
    p.wait_state(task["id"], "succeeded")
    assert p.cli("gpu", "cordon", "GPU-nope").returncode == 2
