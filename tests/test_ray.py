"""The Ray backend on a real Ray cluster: several nodes on 127.0.0.1 in one machine."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import psutil
import pytest

from gpuprovider.cli.client import Client
from gpuprovider.cli.task import send_folder
from gpuprovider.telemetry.standin import ENV as STANDIN_NVML
from gpuprovider.testing import (
    GPUPROVIDER,
    Provider,
    StandinGpus,
    free_port,
    kill_task_processes,
    make_home,
    ray_cluster,
    ray_home,
    running,
    wait_for,
    watch_home,
)

pytest.importorskip("ray.cluster_utils")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep every Ray process on 127.0.0.1

pytestmark = pytest.mark.slow

PY = sys.executable


def gpuprovider_node(cluster, name, sims, ray_gpus=0):
    labels = {"gpuprovider.io/node": "1", "gpuprovider.io/name": name}
    labels.update({f"gpuprovider.io/sim-{model}": str(n) for model, n in sims})
    return cluster.add_node(
        num_cpus=2, num_gpus=ray_gpus, node_ip_address="127.0.0.1", labels=labels
    )


@pytest.fixture(scope="module")
def cluster():
    made = ray_cluster()
    made.nodes_by_name = {
        # its GPUs are Ray's as well: the provider's agent claims them
        "node-h100": gpuprovider_node(made, "node-h100", [("h100-80gb-sxm", 2)], ray_gpus=2),
        "node-a100": gpuprovider_node(made, "node-a100", [("a100-80gb-sxm", 1)]),
    }
    made.wait_for_nodes()
    yield made
    made.shutdown()


@pytest.fixture(scope="module")
def ray_provider(cluster, tmp_path_factory):
    port = free_port()
    root = tmp_path_factory.mktemp("ray-home")
    home = make_home(root, port, gpus="", gateway_port=free_port())
    (root / "kern.log").write_text("")  # every node of this cluster is this machine
    watch_home(home, root / "kern.log", interval_s=1.0)
    # an agent swapped behind the provider's back is found at the next full discovery
    ray_home(home, cluster.address, inventory_interval_s=5.0)
    with running(home, port) as provider:
        provider.cluster_address = cluster.address
        yield provider


def kill_processes_of(task_id):
    for proc in psutil.process_iter(["environ"]):
        with contextlib.suppress(psutil.Error):
            if (proc.info["environ"] or {}).get("GPUPROVIDER_TASK_ID") == task_id:
                proc.kill()


def nodes_by_name(p):
    return {n["name"]: n for n in p.api.get("/nodes").json()}


def test_nodes_come_from_ray_with_their_declared_gpus(ray_provider):
    nodes = wait_for(
        lambda: len(nodes_by_name(ray_provider)) == 2 and nodes_by_name(ray_provider), 60
    )
    assert {n["backend"] for n in nodes.values()} == {"ray"}
    gpus = ray_provider.api.get("/gpus").json()
    models = {(g["node"], g["model"]) for g in gpus}
    assert models == {("node-h100", "h100-80gb-sxm"), ("node-a100", "a100-80gb-sxm")}
    assert len([g for g in gpus if g["node"] == "node-h100"]) == 2


def test_placement_follows_the_model_and_runs_on_that_ray_node(ray_provider, cluster):
    script = (
        "import os; print(os.environ['GPUPROVIDER_RAY_NODE'], os.environ['CUDA_VISIBLE_DEVICES'])"
    )
    task = ray_provider.submit(
        name="on-a100", command=[PY, "-c", script], resources={"gpu": "A100:1"}
    )
    done = ray_provider.wait_state(task["id"], "succeeded", timeout=60)
    assert done["allocation"]["node"] == "node-a100"
    ray_node, visible = ray_provider.logs(task["id"]).split()
    assert ray_node == cluster.nodes_by_name["node-a100"].node_id and visible == "0"
    followed = ray_provider.cli("task", "logs", "on-a100", "--follow")
    assert followed.returncode == 0 and ray_node in followed.stdout


def test_cancel_stops_the_process_on_its_node(ray_provider):
    task = ray_provider.submit(
        name="sleeper",
        command=[PY, "-c", "import time; time.sleep(300)"],
        resources={"gpu": "H100:2"},
    )
    ray_provider.wait_state(task["id"], "running", timeout=60)
    cancelled = ray_provider.cli("task", "cancel", "sleeper")
    assert cancelled.returncode == 0
    ended = ray_provider.wait_state(task["id"], "cancelled", timeout=60)
    assert ended["allocation"]["node"] == "node-h100"


def test_an_upload_runs_on_a_ray_node_its_files_come_out_and_volumes_are_refused(
    ray_provider, tmp_path
):
    src = tmp_path / "proj"
    src.mkdir()
    (src / "main.py").write_text("open('out.txt', 'w').write(open('in.txt').read() * 3)")
    (src / "in.txt").write_text("ray ")
    ref = send_folder(Client(ray_provider.url, ray_provider.token), src)
    task = ray_provider.submit(
        command=[PY, "main.py"], upload=ref, resources={"gpu": "A100:1"}, name="uploaded"
    )
    done = ray_provider.wait_state(task["id"], {"succeeded", "failed"}, timeout=60)
    assert done["state"] == "succeeded", done["reason"]
    assert done["allocation"]["node"] == "node-a100"
    got = ray_provider.api.get(f"/tasks/{task['id']}/download", params={"path": "out.txt"})
    assert got.status_code == 200 and got.content == b"ray ray ray "
    names = [f["name"] for f in ray_provider.api.get(f"/tasks/{task['id']}/files").json()]
    assert names == ["in.txt", "main.py", "out.txt"]
    missing = ray_provider.api.get(f"/tasks/{task['id']}/download", params={"path": "../x"})
    assert missing.status_code == 404
    assert ray_provider.api.post("/volumes", json={"name": "v", "size_mib": 8}).status_code == 201
    spec = {"command": ["true"], "volumes": [{"name": "v", "path": "v"}]}
    refused = ray_provider.api.post("/tasks", json=spec)
    assert refused.status_code == 422 and "only the local backend" in refused.json()["error"]


def test_max_duration_as_on_the_local_backend(ray_provider):
    task = ray_provider.submit(
        name="too-long", command=[PY, "-c", "import time; time.sleep(60)"], max_duration_s=1
    )
    ended = ray_provider.wait_state(task["id"], "failed", timeout=60)
    assert "max duration" in ended["reason"]


def test_exit_codes_and_retries_as_on_the_local_backend(ray_provider):
    task = ray_provider.submit(
        name="fails",
        command=[PY, "-c", "raise SystemExit(3)"],
        resources={"gpu": 1},
        retry={"attempts": 2, "backoff_s": 0},
    )
    ended = ray_provider.wait_state(task["id"], "failed", timeout=60)
    assert ended["exit_code"] == 3 and ended["attempt"] == 2


# Run as a second Ray driver in its own process, so that Ray reads
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before it is imported and talks on 127.0.0.1 only:
# a tenant's task that found Ray. It finds the agents by name, tries to use one, then
# puts an agent of an older gpuprovider in place of another.
BORROWER = """
import sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

address, run_dir = sys.argv[1:]
ray.init(address=address, namespace="gpuprovider", log_to_driver=False)
ray_ids = {
    (n.get("Labels") or {}).get("gpuprovider.io/name"): n["NodeID"]
    for n in ray.nodes() if n["Alive"]
}
agent = ray.get_actor(f"agent-{ray_ids['node-h100']}")
for call in (
    agent.read_log.remote("guessed", run_dir, 0, 100),
    agent.recover.remote("guessed", run_dir, 1),
):
    try:
        ray.get(call)
        print("served")
    except ray.exceptions.RayTaskError as exc:
        print("refused" if "serves its provider only" in str(exc) else str(exc)[:200])

@ray.remote(num_gpus=1)
def grab():
    return "got a GPU"

try:  # the only Ray GPUs are node-h100's, which the provider's agent holds
    print(ray.get(grab.remote(), timeout=5))
except ray.exceptions.GetTimeoutError:
    print("no-gpu")

class OlderAgent:  # as an older gpuprovider made them: no credential, another signature
    def inventory(self, address):
        return None

name = f"agent-{ray_ids['node-a100']}"
ray.kill(ray.get_actor(name), no_restart=True)
while True:
    try:
        ray.remote(OlderAgent).options(
            name=name,
            lifetime="detached",
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray_ids["node-a100"], soft=False),
        ).remote()
        break
    except ValueError:  # the name is still held by the one killed
        pass
print("swapped")
"""


def test_agents_cannot_be_borrowed_nor_their_gpus_and_an_older_one_is_replaced(
    ray_provider, tmp_path
):
    # before the dead-node test below, which takes a node away
    wait_for(lambda: len(nodes_by_name(ray_provider)) == 2, 60, "both nodes")
    done = subprocess.run(
        [PY, "-c", BORROWER, ray_provider.cluster_address, str(tmp_path)],
        env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["refused", "refused", "no-gpu", "swapped"]
    wait_for(lambda: "replacing the agent on Ray node" in ray_provider.log(), 60, "a replacement")
    task = ray_provider.submit(
        name="after-swap", command=[PY, "-c", "print('ok')"], resources={"gpu": "A100:1"}
    )
    assert ray_provider.wait_state(task["id"], "succeeded", timeout=60)["exit_code"] == 0


def test_a_dead_node_is_noticed_its_job_retried_and_its_service_restarted_elsewhere(
    ray_provider, cluster
):
    job = ray_provider.submit(
        name="survivor",
        command=[
            PY,
            "-c",
            "import os, time; print(os.environ['GPUPROVIDER_RAY_NODE']); "
            "time.sleep(1 if os.environ['GPUPROVIDER_ATTEMPT'] != '1' else 300)",
        ],
        resources={"gpu": "H100|A100:0.5"},
        retry={"attempts": 3, "backoff_s": 0},
    )
    running = ray_provider.wait_state(job["id"], "running", timeout=60)
    victim = running["allocation"]["node"]
    service = ray_provider.submit(
        name="web-on-ray",
        kind="service",
        command=[PY, "-c", "import time; time.sleep(300)"],
        resources={"gpu": "H100|A100:0.5"},
    )
    served = ray_provider.wait_state(service["id"], "running", timeout=60)
    assert served["allocation"]["node"] == victim  # packed beside the job (best-fit)
    cluster.remove_node(cluster.nodes_by_name[victim], allow_graceful=False)
    try:
        ended = ray_provider.wait_state(job["id"], "succeeded", timeout=90)
        moved = wait_for(
            lambda: (
                (t := ray_provider.task(service["id"]))["state"] == "running"
                and t["allocation"]["node"] != victim
                and t
            ),
            60,
            "the service to run elsewhere",
        )
    finally:
        kill_processes_of(job["id"])  # on one machine, the dead node's processes live on
        kill_processes_of(service["id"])
    assert "died" in " ".join(e["reason"] for e in ended["events"])
    assert ended["allocation"]["node"] != victim
    assert any("restarting" in e["reason"] for e in moved["events"])
    gone = wait_for(lambda: nodes_by_name(ray_provider)[victim]["status"] == "unreachable", 30)
    assert gone
    ray_provider.api.post(f"/tasks/{service['id']}/cancel")


def test_daemon_kill_9_and_restart_re_adopts_tasks_on_ray(ray_provider, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    script = (
        "import os, time, pathlib; "
        f"pathlib.Path({str(marks)!r}, 'ran-' + os.environ['GPUPROVIDER_ATTEMPT']).touch(); "
        "time.sleep(4)"
    )
    task = ray_provider.submit(
        name="outlives", command=[PY, "-c", script], resources={"gpu": "H100:1"}
    )
    ray_provider.wait_state(task["id"], "running", timeout=60)
    ray_provider.stop(signal.SIGKILL)
    ray_provider.start()
    ended = ray_provider.wait_state(task["id"], "succeeded", timeout=60)
    assert ended["attempt"] == 1 and [p.name for p in marks.iterdir()] == ["ran-1"]


def test_join_checks_the_head_then_wraps_ray_start(ray_provider, cluster):
    done = ray_provider.cli(
        "node",
        "join",
        cluster.address,
        "--name",
        "gpu-box",
        "--simulate-gpu",
        "h100-80gb-sxm:2",
        "--label",
        "zone=eu",
        "--num-cpus",
        "4",
        "--dry-run",
    )
    assert done.returncode == 0, done.stderr
    command = done.stdout.strip().splitlines()[-1]
    assert f"ray start --address {cluster.address} --labels " in command
    for label in (
        "gpuprovider.io/node=1",
        "gpuprovider.io/name=gpu-box",
        "gpuprovider.io/sim-h100-80gb-sxm=2",
        "zone=eu",
    ):
        assert label in command
    unreachable = ray_provider.cli("node", "join", "127.0.0.1:1")
    assert unreachable.returncode == 1 and "nothing answers at 127.0.0.1:1" in unreachable.stderr
    malformed = ray_provider.cli("node", "join", "head-without-port")
    assert malformed.returncode == 2 and "write host:port" in malformed.stderr
    bad_gpu = ray_provider.cli("node", "join", cluster.address, "--simulate-gpu", "h100:2")
    assert bad_gpu.returncode == 2 and "names several models" in bad_gpu.stderr


def test_unreachable_ray_address_is_logged_and_the_api_keeps_serving(tmp_path):
    port = free_port()
    home = make_home(tmp_path / "home", port, gpus="")
    ray_home(home, "127.0.0.1:1")
    provider = Provider(home, port)
    provider.start()
    try:
        task = provider.submit(command=["true"])
        waiting = wait_for(lambda: "no node" in (t := provider.task(task["id"]))["reason"] and t)
        assert waiting["state"] == "queued"
        wait_for(lambda: "nothing answers at 127.0.0.1:1" in provider.log())
        assert provider.api.get("/health").status_code == 200
    finally:
        provider.stop()


def test_readme_trial_walkthrough_up_with_local_ray_nodes(tmp_path):
    """`gpuprovider up --backend ray --ray-node ...`: a local Ray head and trial nodes."""
    port = free_port()
    home = make_home(tmp_path / "home", port, gpus="")
    provider = Provider(home, port)
    provider.up_args = [
        "--backend",
        "ray",
        "--ray-node",
        "big=h100-80gb-sxm:2",
        "--ray-node",
        "small=a10-24gb:1",
    ]
    provider.start_timeout_s = 90.0  # it starts a Ray head and two nodes first
    try:
        provider.start()
        nodes = wait_for(lambda: len(nodes_by_name(provider)) == 2 and nodes_by_name(provider), 60)
        assert {n["backend"] for n in nodes.values()} == {"ray"}
        ran = provider.cli(
            "task",
            "run",
            "--gpu",
            "A10:1",
            "--name",
            "hello",
            "--",
            PY,
            "-c",
            "print('hello from', 'small')",
        )
        assert ran.returncode == 0, ran.stderr
        done = provider.wait_state("hello", "succeeded", timeout=60)
        assert done["allocation"]["node"] == "small"
        assert provider.logs("hello").strip() == "hello from small"
    finally:
        provider.stop()
        kill_task_processes(provider.home)  # the runner servers the trial's agents started
    assert provider.proc.returncode == 0
    assert "starting a local Ray cluster: head + 2 node(s)" in provider.log()


def test_agents_report_gpu_telemetry_and_rules_act_on_ray_nodes(ray_provider, cluster, tmp_path):
    """A Ray node with (stand-in) NVIDIA GPUs: its agent samples them for /metrics, and
    an XID in its kernel log cordons the GPU on that node."""
    gpus = StandinGpus(tmp_path / "nvml.json", 2)
    os.environ[STANDIN_NVML] = str(gpus.path)  # inherited by this node's raylet only
    try:
        node = gpuprovider_node(cluster, "node-nvml", [])
    finally:
        del os.environ[STANDIN_NVML]
    try:
        found = wait_for(
            lambda: (n := nodes_by_name(ray_provider).get("node-nvml")) and n["gpu_count"] == 2,
            60,
            "the node's NVML GPUs",
        )
        assert found
        headers = {"Authorization": f"Bearer {ray_provider.token}"}
        wait_for(
            lambda: (
                'node="node-nvml"'
                in httpx.get(ray_provider.url + "/metrics", headers=headers).text.split(
                    "gpuprovider_gpu_utilization_ratio", 1
                )[-1]
            ),
            30,
            "the agent's telemetry in /metrics",
        )
        kernel_log = ray_provider.home.root / "kern.log"
        with kernel_log.open("a") as f:
            f.write(gpus.kernel_line(1, 48, "double bit error"))
        uuid = gpus.gpus[1]["uuid"]

        def cordoned() -> bool:
            listed = ray_provider.api.get("/gpus").json()
            return any(g["uuid"] == uuid and g["cordon_reason"] for g in listed)

        wait_for(cordoned, 30, "XID 48 on the Ray node to cordon its GPU")
    finally:
        cluster.remove_node(node, allow_graceful=False)


def test_a_service_on_a_ray_node_is_reachable_through_the_gateway(ray_provider):
    """The gateway reaches a replica at its node's address and the port that node chose."""
    config = ray_provider.home.config.read_text()
    gateway_port = int(config.split("[gateway]", 1)[1].split("port = ", 1)[1].split()[0])
    server = (
        "import os, http.server\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        b = os.environ['GPUPROVIDER_RAY_NODE'].encode()\n"
        "        self.send_response(200); self.send_header('Content-Length', str(len(b)))\n"
        "        self.end_headers(); self.wfile.write(b)\n"
        "http.server.HTTPServer(('127.0.0.1', int(os.environ['PORT'])), H).serve_forever()"
    )
    task = ray_provider.submit(
        name="ray-web",
        kind="service",
        command=[PY, "-c", server],
        ports=["http"],
        serve={"auth": "public"},
    )
    running = ray_provider.wait_state(task["id"], "running", timeout=60)
    assert running["allocation"]["node"].startswith("node-")  # a Ray node of the cluster

    def answered() -> httpx.Response | None:
        try:
            answer = httpx.get(f"http://127.0.0.1:{gateway_port}/s/ray-web/", timeout=5)
        except httpx.TransportError:
            return None
        return answer if answer.status_code == 200 else None

    answer = wait_for(answered, 60, "the Ray replica through the gateway")
    assert answer.text  # the Ray node id the replica runs on
    ray_provider.api.post(f"/tasks/{task['id']}/cancel")


def test_join_and_connect_give_up_on_an_address_that_is_not_a_ray_head(ray_provider, tmp_path):
    """A port that answers, but not as Ray (a web server): refused within seconds, by
    `node join` and by the daemon, whose API keeps serving."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{server.server_port}"
    try:
        done = ray_provider.cli("node", "join", address, "--dry-run", timeout=60)
        assert done.returncode == 1 and "is not a Ray head" in done.stderr, done.stderr
        port = free_port()
        home = make_home(tmp_path / "home", port, gpus="")
        ray_home(home, address)
        provider = Provider(home, port)
        provider.start()
        try:
            wait_for(lambda: "is not a Ray head" in provider.log(), 60, "the refusal")
            assert provider.api.get("/health").status_code == 200
        finally:
            provider.stop()
    finally:
        server.shutdown()


def test_a_driver_without_the_heads_ray_folder_is_refused_clearly(ray_provider):
    """As in a Kubernetes pod: the provider's container beside the Ray head's. With a
    /tmp/ray of its own (the manifest before it shared the head's) a Ray driver aborts
    its process; `join` and the daemon try one aside first and say what to fix."""
    temp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths
    head = ray_cluster(num_cpus=0, temp_dir=temp)
    try:
        own_folder = 'mount -t tmpfs tmpfs "$1" && exec "$2" node join "$3" --dry-run'
        done = subprocess.run(
            ["unshare", "-m", "sh", "-c", own_folder, "sh", temp, GPUPROVIDER, head.address],
            env={**os.environ, "GPUPROVIDER_HOME": str(ray_provider.home.root)},
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 1 and "share /tmp/ray" in done.stderr, done.stderr[-1000:]
        # the folder shared: the driver starts, and finds a Ray cluster that is not a
        # provider's (no provider ever connected to it)
        shared = ray_provider.cli("node", "join", head.address, "--dry-run", timeout=180)
        assert shared.returncode == 1 and "not a gpuprovider cluster" in shared.stderr
    finally:
        head.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
