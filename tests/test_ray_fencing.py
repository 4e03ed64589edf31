"""Fencing on a real Ray cluster (nodes on 127.0.0.1): whatever happens to a node (its
raylet killed, its agent killed, cut off, Ray restarted there), an attempt never runs
in two places, and the node comes back as itself.

Each job writes a heartbeat line per 0.1 s into a file of its attempt; two attempts ran
at once if one's heartbeats overlap another's."""

import contextlib
import os
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from gpuprovider.testing import (
    HEARTBEAT_JOB,
    concurrent_attempts,
    free_port,
    heartbeats,
    make_home,
    ray_cluster,
    ray_home,
    running,
    wait_for,
)

pytest.importorskip("ray.cluster_utils")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep every Ray process on 127.0.0.1

pytestmark = pytest.mark.slow

LEASE_S, GRACE_S = 3.0, 1.0
# the shipped rule's 15 min, made short enough for a test (and long enough for the
# tests that look at an unreachable node)
NODE_LOST_RULE = """
[[repair.rules]]
name = "node-lost"
signal = "node_unreachable"
window = "20s"
actions = ["remove_node", "alert"]
"""


def add_node(cluster, name):
    labels = {
        "gpuprovider.io/node": "1",
        "gpuprovider.io/name": name,
        "gpuprovider.io/sim-h100-80gb-sxm": "1",
    }
    node = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", labels=labels)
    cluster.by_name[name] = node
    return node


@pytest.fixture(scope="module")
def cluster():
    made = ray_cluster()
    made.by_name = {}
    for name in ("left", "right", "spare"):
        add_node(made, name)
    made.wait_for_nodes()
    yield made
    made.shutdown()


@pytest.fixture(scope="module")
def provider(cluster, tmp_path_factory):
    port = free_port()
    root = tmp_path_factory.mktemp("fencing")
    home = make_home(root, port, gpus="")
    ray_home(home, cluster.address, LEASE_S, GRACE_S, node_dir=root / "on-nodes")
    home.config.write_text(home.config.read_text() + NODE_LOST_RULE)
    with running(home, port) as p:
        wait_for(lambda: len(ready_nodes(p)) == 3, 60, "three ready nodes")
        p.node_dir = root / "on-nodes"
        yield p


def ready_nodes(p) -> dict[str, dict]:
    return {name: n for name, n in listed(p).items() if n["status"] == "ready"}


def beating_job(p, marks: Path, name: str) -> dict:
    marks.mkdir()
    task = p.submit(
        name=name,
        command=[sys.executable, "-c", HEARTBEAT_JOB, str(marks)],
        resources={"gpu": "H100:1"},
        retry={"attempts": 5, "backoff_s": 0},
    )
    running_task = p.wait_state(task["id"], "running", timeout=60)
    wait_for(lambda: (marks / str(running_task["attempt"])).exists(), 30, "the first beat")
    return running_task


def assert_never_twice(marks: Path) -> dict[int, list[float]]:
    """No two attempts beat at the same time: each ended before the next began."""
    assert concurrent_attempts(marks) == [], "attempts ran at once"
    return heartbeats(marks)


def node_processes(cluster, name) -> tuple[psutil.Process, list[psutil.Process]]:
    """The node's raylet and its gpuprovider agent's worker process."""
    raylet = psutil.Process(cluster.by_name[name].all_processes["raylet"][0].process.pid)
    agents = []
    for child in raylet.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # gone, or a zombie: not an agent now
            if "NodeAgent" in " ".join(child.cmdline()):
                agents.append(child)
    return raylet, agents


def on_another_node(p, task_id: str, victim: str, marks: Path) -> dict:
    moved = wait_for(
        lambda: (
            (t := p.task(task_id))["state"] == "running"
            and t["allocation"]["node"] != victim
            and (marks / str(t["attempt"])).exists()
            and t
        ),
        60,
        "the job to run on another node",
    )
    time.sleep(1.0)  # beats of both, if both ran
    return moved


def finish(p, task_id: str) -> None:
    p.api.post(f"/tasks/{task_id}/cancel")
    p.wait_state(task_id, "cancelled", timeout=60)


def test_a_cut_off_node_stops_its_attempt_before_it_runs_elsewhere(provider, cluster, tmp_path):
    """A partition: the node's raylet and agent stop answering (SIGSTOP), its runner and
    task run on. The runner kills the task when the lease runs out; only then does the
    provider start it elsewhere. The node comes back as itself."""
    marks = tmp_path / "marks"
    task = beating_job(provider, marks, "partitioned")
    victim = task["allocation"]["node"]
    raylet, agents = node_processes(cluster, victim)
    stopped = [raylet, *agents]
    for proc in stopped:
        proc.send_signal(signal.SIGSTOP)
    try:
        moved = on_another_node(provider, task["id"], victim, marks)
    finally:
        for proc in stopped:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGCONT)
    seen = assert_never_twice(marks)
    assert moved["attempt"] > task["attempt"] and len(seen) == 2
    events = " ".join(e["reason"] for e in moved["events"])
    assert "lost" in events
    finish(provider, task["id"])


def test_a_killed_raylet_stops_its_attempt_and_ray_restarted_brings_the_node_back(
    provider, cluster, tmp_path
):
    marks = tmp_path / "marks"
    task = beating_job(provider, marks, "raylet-killed")
    victim = task["allocation"]["node"]
    before = {n["name"]: n["id"] for n in provider.api.get("/nodes").json()}
    cluster.remove_node(cluster.by_name[victim], allow_graceful=False)  # kill -9 its Ray
    wait_for(
        lambda: provider.api.get(f"/nodes/{victim}").json()["status"] == "unreachable",
        30,
        "the node to be unreachable",
    )
    log = provider.api.get(f"/tasks/{task['id']}/logs")
    if provider.task(task["id"])["allocation"]["node"] == victim:  # not moved yet
        assert log.status_code == 503 and "does not answer" in log.json()["error"]
    on_another_node(provider, task["id"], victim, marks)
    assert_never_twice(marks)
    gone = wait_for(
        lambda: (n := provider.api.get(f"/nodes/{victim}").json())["status"] == "unreachable" and n,
        30,
        "the node to be unreachable",
    )
    assert gone["id"] == before[victim]
    refused = provider.api.post(f"/nodes/{victim}/resume")
    assert refused.status_code == 409 and "unreachable" in refused.json()["error"]
    # Ray started again on that machine: the same node, not a ghost beside the old one
    add_node(cluster, victim)
    back = wait_for(lambda: ready_nodes(provider).get(victim), 60, "the node to come back")
    assert back["id"] == before[victim]
    assert {n["name"]: n["id"] for n in provider.api.get("/nodes").json()} == before
    finish(provider, task["id"])


def test_a_killed_agent_is_restarted_and_its_attempt_never_runs_twice(provider, cluster, tmp_path):
    marks = tmp_path / "marks"
    task = beating_job(provider, marks, "agent-killed")
    victim = task["allocation"]["node"]
    _, agents = node_processes(cluster, victim)
    assert agents
    for agent in agents:
        agent.kill()
    wait_for(lambda: node_processes(cluster, victim)[1], 60, "Ray to restart the agent")
    time.sleep(LEASE_S + GRACE_S + 1)  # long enough for a lost lease to show
    now = provider.task(task["id"])
    assert now["state"] == "running"
    seen = assert_never_twice(marks)
    assert max(seen[max(seen)]) > time.time() - 1  # the attempt running now still beats
    # its lease is not renewed from the first failed call: an agent that Ray restarts in
    # less than the lease keeps its attempt; here (3 s, a busy machine) it may not, and
    # the node is unreachable until its new agent answers, as itself
    back = wait_for(lambda: ready_nodes(provider).get(victim), 60, "the node to answer")
    assert back["id"] == task["allocation"]["node_id"]
    # the node keeps the task's folder, its key and its lease under [backend] node_dir
    assert (provider.node_dir / task["id"] / "output.log").exists()
    assert (provider.node_dir / "nodes" / victim / "node.key").exists()
    finish(provider, task["id"])


def redis_answers() -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", 6379), 2) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")
    return False


def test_a_gcs_outage_leaves_the_api_up_and_the_work_running(tmp_path, monkeypatch):
    """Ray's GCS fault tolerance with an external Redis (the README's recipe): the GCS
    dies and comes back; the provider's API answers all along, the job runs on (or, if
    its node's lease ran out, once, elsewhere), and the provider finds its nodes again."""
    if not redis_answers():
        pytest.skip("no Redis answers on 127.0.0.1:6379 (.ci/run starts one)")
    monkeypatch.setenv("RAY_external_storage_namespace", f"gpp-{uuid.uuid4().hex}")
    made = ray_cluster(external_addresses=["127.0.0.1:6379"])
    made.by_name = {}
    try:
        for name in ("left", "right"):
            add_node(made, name)
        made.wait_for_nodes()
        port = free_port()
        home = make_home(tmp_path / "home", port, gpus="")
        ray_home(home, made.address, LEASE_S)
        with running(home, port) as p:
            wait_for(lambda: len(ready_nodes(p)) == 2, 60, "two ready nodes")
            marks = tmp_path / "marks"
            task = beating_job(p, marks, "through-an-outage")
            made.head_node.kill_gcs_server()
            answered = []
            try:
                for _ in range(40):  # 8 s without a GCS
                    answered.append(p.api.get("/health", timeout=5).status_code)
                    time.sleep(0.2)
            finally:
                made.head_node.start_gcs_server()
            assert answered == [200] * 40
            wait_for(lambda: "GCS has not answered" in p.log(), 30, "the outage in the log")
            wait_for(lambda: len(ready_nodes(p)) == 2, 60, "both nodes after the outage")
            now = wait_for(
                lambda: (t := p.task(task["id"]))["state"] == "running" and t, 60, "the job"
            )
            time.sleep(1.0)
            seen = assert_never_twice(marks)
            assert max(seen[now["attempt"]]) > time.time() - 1  # still beating
            finish(p, task["id"])
    finally:
        made.shutdown()


def test_a_dead_host_is_fenced_like_a_dead_raylet(provider, cluster, tmp_path):
    """The whole machine goes: its raylet, its agent, the task's runner and the task."""
    marks = tmp_path / "marks"
    task = beating_job(provider, marks, "host-killed")
    victim = task["allocation"]["node"]
    doomed = node_processes(cluster, victim)[1]
    for proc in psutil.process_iter(["environ"]):
        with contextlib.suppress(psutil.Error):
            if (proc.info["environ"] or {}).get("GPUPROVIDER_TASK_ID") == task["id"]:
                doomed += [proc, proc.parent()]
    for proc in doomed:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    cluster.remove_node(cluster.by_name.pop(victim), allow_graceful=False)
    on_another_node(provider, task["id"], victim, marks)
    assert_never_twice(marks)
    # gone for longer than the rule's window: lost, and removed by the repair rule
    lost = wait_for(
        lambda: (n := listed(provider, removed=True)[victim])["status"] == "removed" and n,
        60,
        "the node to be removed as lost",
    )
    assert "node-lost" in lost["reason"] and victim not in listed(provider)
    events = provider.cli("repair", "events").stdout
    assert "node-lost" in events and "remove_node" in events
    add_node(cluster, victim)  # the machine back: the same node, registered again
    back = wait_for(lambda: ready_nodes(provider).get(victim), 60, "the node to come back")
    assert back["id"] == lost["id"]
    finish(provider, task["id"])


def test_a_daemon_down_longer_than_the_lease_has_its_attempts_fenced_and_run_once_more(
    provider, tmp_path
):
    """kill -9 of the daemon, restarted after its nodes' leases ran out: the runners
    stopped their attempts on their own; the new daemon finds them fenced, counts them
    lost (not the task's fault) and runs each once more, never beside the old one."""
    marks = tmp_path / "marks"
    task = beating_job(provider, marks, "outlived-its-lease")
    provider.stop(signal.SIGKILL)
    time.sleep(LEASE_S + GRACE_S + 1)
    ended_at = max(heartbeats(marks)[task["attempt"]])
    provider.start()
    again = wait_for(
        lambda: (
            (t := provider.task(task["id"]))["state"] == "running"
            and t["attempt"] > task["attempt"]
            and (marks / str(t["attempt"])).exists()
            and t
        ),
        60,
        "the job to run again",
    )
    assert ended_at < time.time() - 1  # it had stopped before the daemon came back
    seen = assert_never_twice(marks)
    assert sorted(seen) == [task["attempt"], again["attempt"]]
    events = " ".join(e["reason"] for e in again["events"])
    assert "fenced" in events
    finish(provider, task["id"])


def test_a_node_whose_agent_answers_late_is_asked_again_soon(provider, cluster):
    """A restarted daemon whose first question to a node's agent goes unanswered (a busy
    or paused agent) asks again within seconds, not at the next full discovery (30 s):
    meanwhile that node's tasks would be given up as lost."""
    provider.stop(signal.SIGKILL)
    _, agents = node_processes(cluster, "spare")
    for agent in agents:
        agent.send_signal(signal.SIGSTOP)
    try:
        started = time.time()
        provider.start()
        wait_for(lambda: {"left", "right"} <= seen_since(provider, started), 60, "two nodes")
        time.sleep(1.0)
        assert "spare" not in seen_since(provider, started)
    finally:
        for agent in agents:
            agent.send_signal(signal.SIGCONT)
    resumed = time.time()
    wait_for(lambda: "spare" in seen_since(provider, resumed), 60, "the late node")
    assert time.time() - resumed < 20  # long before the next full discovery


def listed(p, removed: bool = False) -> dict[str, dict]:
    return {n["name"]: n for n in p.api.get("/nodes", params={"removed": removed}).json()}


def seen_since(p, since: float) -> set[str]:
    return {n["name"] for n in p.api.get("/nodes").json() if n["last_heartbeat"] > since}


def test_nodes_a_rebuilt_ray_cluster_lacks_become_unreachable_not_ghosts(provider):
    """The Ray cluster made again without GCS fault tolerance (or the provider pointed at
    another one): its nodes the new cluster does not list are unreachable, and nothing
    is placed there; the nodes it has register."""
    other = ray_cluster()
    other.by_name = {}
    config = provider.home.config.read_text()
    try:
        add_node(other, "fresh")
        other.wait_for_nodes()
        provider.stop()
        ray_home(provider.home, other.address)
        provider.start()
        gone = wait_for(
            lambda: (
                (nodes := listed(provider))["fresh"]["status"] == "ready"
                and all(nodes[n]["status"] == "unreachable" for n in ("left", "right", "spare"))
                and nodes
            ),
            60,
            "the old nodes unreachable and the new one ready",
        )
        assert "no longer finds it" in gone["left"]["reason"]
        task = provider.submit(command=["true"], resources={"gpu": "H100:1"})
        ended = provider.wait_state(task["id"], "succeeded", timeout=60)
        assert ended["allocation"]["node"] == "fresh"
    finally:
        provider.stop()
        provider.home.config.write_text(config)
        other.shutdown()
        provider.start()
