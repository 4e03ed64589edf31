"""The Ray backend's control plane under trouble (issue 26): the driver's leases to its
nodes, stopping cleanly, the cluster marker `node join` reads, a GCS outage.

The first tests drive `RayBackend` against a stand-in for Ray (no cluster: what each
call carried is what is checked); the slow ones run a real Ray cluster on 127.0.0.1."""

import json
import os
import signal
import sys
import time
from types import SimpleNamespace

import pytest

from gpuprovider.backends.base import Handle, NodeNotReady
from gpuprovider.backends.launch import Launch
from gpuprovider.backends.ray.common import GCS_RECONNECT_ENV, RayBackendError
from gpuprovider.backends.ray.driver import GRACE_S, LEASE_S, RayBackend, attempt_key
from gpuprovider.backends.ray.join import provider_running

# -- a stand-in for Ray: each agent call answers, fails, or never answers ------------


class Ref:
    def __init__(self, node: str, method: str, args: tuple, outcome: object):
        self.node, self.method, self.args, self.outcome = node, method, args, outcome


class StandinAgent:
    def __init__(self, node: str, calls: list[Ref]):
        self.node, self.calls = node, calls
        self.outcome: object = "answer"  # "answer", "late", or an exception to raise

    def __getattr__(self, method: str):
        agent = self

        class Method:
            @staticmethod
            def remote(credential: str, *args):
                ref = Ref(agent.node, method, args, agent.outcome)
                agent.calls.append(ref)
                return ref

        return Method


class MarkerStore:
    """The GCS client's key-value store, as the driver writes the cluster marker."""

    value = b""

    def internal_kv_put(self, key, value, overwrite, namespace, timeout=None):
        self.value = value


class StandinRay:
    def __init__(self):
        gcs = SimpleNamespace(gcs_client=MarkerStore())
        self._private = SimpleNamespace(worker=SimpleNamespace(global_worker=gcs))

    def wait(self, refs, num_returns, timeout):
        ready = [r for r in refs if r.outcome != "late"]
        return ready, [r for r in refs if r.outcome == "late"]

    def get(self, ref):
        if isinstance(ref.outcome, Exception):
            raise ref.outcome
        if ref.method == "poll_many":
            return [None for _ in ref.args[0]]
        return None


def standin_backend(tmp_path, grants: dict | None = None, **settings) -> RayBackend:
    tmp_path.mkdir(parents=True, exist_ok=True)
    grants_file = tmp_path / "ray.grants.json"
    if grants is not None:
        grants_file.write_text(json.dumps({"nodes": grants}))
    backend = RayBackend(
        "", tmp_path / "tasks", tmp_path / "ray.credential", grants_file=grants_file, **settings
    )
    backend.ray, backend.calls = StandinRay(), []
    backend.agents = {"n1": StandinAgent("n1", backend.calls)}
    return backend


def handle(run: str = "run-a") -> Handle:
    return Handle(pid=1, start_time=0.0, run_dir=f"/tasks/{run}", attempt=1, node_id="n1")


def carried(ref: Ref) -> float:
    return ref.args[1]  # (handles, deadline, lease_s, attempts)


def test_the_default_lease_moves_a_dead_nodes_work_within_10_s():
    assert LEASE_S + GRACE_S <= 10  # the bound, with the defaults


def test_a_node_is_not_renewed_after_its_first_failed_call(tmp_path):
    """A dead node's calls fail at once (the actor is gone; Ray restarts it, or says the
    node died seconds later): before, each failed call was followed by one carrying a
    fresh deadline, so its work moved only after Ray declared the node dead. Now the
    first failed (or unanswered) call ends the renewals until a call answers."""
    backend = standin_backend(tmp_path)
    agent = backend.agents["n1"]
    backend.poll_many([handle()])
    agent.outcome = RuntimeError("RayActorError: the actor died")
    backend.poll_many([handle()])  # sent with a fresh deadline: it fails
    renewed = carried(backend.calls[-1])
    for _ in range(3):
        time.sleep(0.01)
        assert backend.poll_many([handle()]) == [None]
        assert carried(backend.calls[-1]) == renewed  # nothing past the deadline sent
    assert backend.deadline["n1"] == renewed
    # nothing is started there meanwhile: the start would carry no lease (and its
    # refusal is not the task's fault)
    launch = Launch("t-1", 1, ["true"], {}, "/tasks/t-1", "/tasks/t-1", node_id="n1")
    sent = len(backend.calls)
    (refused,) = backend.start_many([launch])
    assert isinstance(refused, NodeNotReady) and "did not answer" in str(refused)
    assert len(backend.calls) == sent
    assert not backend.fenced("n1", renewed + GRACE_S - 0.1)
    assert backend.fenced("n1", renewed + GRACE_S + 0.1)
    agent.outcome = "late"  # an answer that does not come in time counts the same
    backend.failing.clear()
    backend.poll_many([handle()])
    late = carried(backend.calls[-1])
    time.sleep(0.01)
    backend.poll_many([handle()])
    assert carried(backend.calls[-1]) == late
    agent.outcome = "answer"  # it answers again: renewed again
    backend.poll_many([handle()])
    time.sleep(0.01)
    backend.poll_many([handle()])
    assert carried(backend.calls[-1]) > late


def test_a_restart_lease_holds_off_fencing_until_it_ends_then_is_cut_back(tmp_path):
    """The grants a clean stop wrote: a node not heard from is not given up before its
    grant ends (a kill -9 wrote none: the usual lease from the start); once the node
    answers a poll, an acknowledged grant is replaced by the usual lease (the agent
    rewrites it), so a node that dies later moves its work as fast as ever."""
    now = time.time()
    backend = standin_backend(tmp_path, grants={"n1": {"deadline": now + 600, "acked": True}})
    assert not backend.fenced("n1", now + 300)
    assert backend.fenced("n1", now + 600 + GRACE_S + 1)
    assert backend.fenced("n3", now + LEASE_S + GRACE_S + 1)  # no grant: the usual
    backend.poll_many([handle()])
    assert backend.fenced("n1", now + 2 * LEASE_S + GRACE_S + 1)
    unacked = standin_backend(
        tmp_path / "b", grants={"n1": {"deadline": now + 600, "acked": False}}
    )
    unacked.poll_many([handle()])  # it may still hear the grant late: kept
    assert not unacked.fenced("n1", now + 300)
    broken = tmp_path / "c"
    broken.mkdir()
    (broken / "ray.grants.json").write_text("{not json")
    careful = standin_backend(broken, restart_grace_s=60)  # unreadable: the longest
    assert not careful.fenced("n9", now + 30)


def test_a_clean_stop_grants_every_answering_node_a_restart_lease(tmp_path):
    backend = standin_backend(tmp_path, restart_grace_s=120)
    backend.agents["n2"] = StandinAgent("n2", backend.calls)
    backend.agents["n2"].outcome = RuntimeError("gone")
    backend.poll_many([handle(), Handle(2, 0.0, "/tasks/run-b", 1, "n2")])
    stopped_at = time.time()
    backend.close()
    renewals = [r for r in backend.calls if r.method == "renew"]
    assert [r.node for r in renewals] == ["n1"]  # n2 failed: it is not renewed
    deadline, period, attempts = renewals[0].args
    assert deadline >= stopped_at + 120 and period == 120
    assert attempts == [attempt_key("/tasks/run-a", 1)]
    written = json.loads((tmp_path / "ray.grants.json").read_text())["nodes"]
    assert written["n1"] == {"deadline": deadline, "acked": True}
    assert written["n2"]["deadline"] < stopped_at + LEASE_S + 1  # what it was last sent
    marker = backend.ray._private.worker.global_worker.gcs_client.value
    assert json.loads(marker)["stopped_at"] >= stopped_at
    after = standin_backend(tmp_path)  # the next daemon
    assert not after.fenced("n1", stopped_at + 100)
    assert after.fenced("n2", stopped_at + LEASE_S + GRACE_S + 2)


def test_join_reads_whether_the_provider_runs():
    now = time.time()

    def marker(**fields) -> bytes:
        return json.dumps({"gpuprovider": "9.9", **fields}).encode()

    assert provider_running("h:1", marker(alive_at=now - 5, renew_s=10), now) == "9.9"
    with pytest.raises(RayBackendError, match="not running: it stopped at"):
        provider_running("h:1", marker(alive_at=now - 5, renew_s=10, stopped_at=now - 5), now)
    with pytest.raises(RayBackendError, match=r"not running: last heard from .* 45 s ago"):
        provider_running("h:1", marker(alive_at=now - 45, renew_s=10), now)
    with pytest.raises(RayBackendError, match="does not say whether it is running"):
        provider_running("h:1", marker(), now)  # an older provider's marker
    with pytest.raises(RayBackendError, match="unreadable marker"):
        provider_running("h:1", b"[1, 2", now)


# -- on a real Ray cluster ------------------------------------------------------------


def ray_test_setup():
    pytest.importorskip("ray.cluster_utils")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray process on 127.0.0.1


def one_node_cluster(**head):
    from gpuprovider.testing import ray_cluster

    made = ray_cluster(**head)
    made.add_node(
        num_cpus=2,
        node_ip_address="127.0.0.1",
        labels={
            "gpuprovider.io/node": "1",
            "gpuprovider.io/name": "solo",
            "gpuprovider.io/sim-h100-80gb-sxm": "1",
        },
    )
    made.wait_for_nodes()
    return made


def ready(p) -> list[str]:
    return [n["name"] for n in p.api.get("/nodes").json() if n["status"] == "ready"]


# Ray's every timeout on this path is 60 s (the driver's GCS client, which ended the
# daemon at 61 s; the raylets', which end the cluster without fault tolerance): an
# outage of 100 s is past both with room to spare. The issue asked for 3 minutes;
# nothing in Ray counts past the first minute, so 100 s shows the same and costs less.
OUTAGE_S = 100


@pytest.mark.slow
@pytest.mark.timeout(OUTAGE_S + 240)
def test_the_api_answers_through_a_gcs_outage_without_fault_tolerance(tmp_path, monkeypatch):
    """No GCS fault tolerance: the GCS dies and stays away past every timeout of Ray's;
    the raylets give up and the cluster is gone, but the daemon lives and its API
    answers every second of it (before: it exited with code 1 at about 61 s)."""
    ray_test_setup()
    from gpuprovider.testing import free_port, make_home, ray_home, running, wait_for

    # the daemon must set Ray's reconnect timeout itself, and the cluster keeps Ray's own
    monkeypatch.delenv(GCS_RECONNECT_ENV, raising=False)
    made = one_node_cluster()
    try:
        port = free_port()
        home = make_home(tmp_path / "home", port, gpus="")
        ray_home(home, made.address, 3.0, 1.0)
        with running(home, port) as p:
            wait_for(lambda: ready(p) == ["solo"], 60, "the node")
            made.head_node.kill_gcs_server()
            answered, started = [], time.monotonic()
            while time.monotonic() - started < OUTAGE_S:
                answered.append(p.api.get("/health", timeout=10).status_code)
                assert p.proc.poll() is None, p.log()[-3000:]
                time.sleep(1.0)
            assert set(answered) == {200} and len(answered) >= OUTAGE_S / 2
            assert "GCS has not answered" in p.log()
            made.head_node.start_gcs_server()  # a new, empty cluster: the node is gone
            wait_for(lambda: ready(p) == [], 60, "the node to be unreachable")
            assert p.api.get("/health").status_code == 200 and p.proc.poll() is None
    finally:
        made.shutdown()


@pytest.mark.slow
def test_a_clean_stop_longer_than_the_lease_costs_no_running_work(tmp_path):
    """SIGTERM, then down for longer than the lease (an upgrade): every node was granted
    a restart lease, so the job runs on meanwhile and the new daemon re-adopts the same
    attempt; `node join` meanwhile says plainly that the provider is not running."""
    ray_test_setup()
    from gpuprovider.testing import (
        HEARTBEAT_JOB,
        concurrent_attempts,
        free_port,
        heartbeats,
        make_home,
        ray_home,
        running,
        wait_for,
    )

    made = one_node_cluster()
    lease_s, grace_s = 3.0, 1.0
    try:
        port = free_port()
        home = make_home(tmp_path / "home", port, gpus="")
        ray_home(home, made.address, lease_s, grace_s)
        with running(home, port) as p:
            wait_for(lambda: ready(p) == ["solo"], 60, "the node")
            marks = tmp_path / "marks"
            marks.mkdir()
            task = p.submit(
                name="upgrade-survivor",
                command=[sys.executable, "-c", HEARTBEAT_JOB, str(marks)],
                resources={"gpu": "H100:1"},
                retry={"attempts": 3, "backoff_s": 0},
            )
            task = p.wait_state(task["id"], "running", timeout=60)
            wait_for(lambda: (marks / "1").exists(), 30, "the first beat")
            assert p.stop(signal.SIGTERM) == 0
            assert "restart leases of 600 s granted to 1 node" in p.log()
            joined = p.cli("node", "join", made.address, "--dry-run")
            assert joined.returncode == 1
            assert "provider of the Ray cluster" in joined.stderr
            assert "is not running: it stopped at" in joined.stderr
            time.sleep(lease_s + grace_s + 2)  # past the usual lease: it would be fenced
            assert max(heartbeats(marks)[1]) > time.time() - 1  # still beating
            p.start()
            time.sleep(lease_s + grace_s + 1)  # long enough for a lost lease to show
            now = p.task(task["id"])
            assert now["state"] == "running" and now["attempt"] == 1
            assert sorted(heartbeats(marks)) == [1] and concurrent_attempts(marks) == []
            assert max(heartbeats(marks)[1]) > time.time() - 1
            joined = p.cli("node", "join", made.address, "--dry-run")
            assert joined.returncode == 0, joined.stderr
    finally:
        made.shutdown()
