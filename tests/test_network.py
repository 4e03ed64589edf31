"""Replicas reachable only through the gateway, jobs kept from each other's ports,
tried as a hostile tenant and a hostile local user would: the machine's nftables table
(isolation/network.py) with a real daemon, its gateway, and tasks as pool users. "The
internet" is a listener in a network namespace of the test's own, behind a veth."""

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from gpuprovider.backends.base import Launch
from gpuprovider.backends.local import LocalProcesses
from gpuprovider.backends.registry import machine_addresses
from gpuprovider.isolation import network
from gpuprovider.isolation.policy import Applied, Settings, undo
from gpuprovider.testing import (
    free_port,
    kill_processes_mentioning,
    make_home,
    running,
    wait_for,
)

TASK_PY = "/usr/bin/python3"
NOBODY = 65534
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the network rules need root"),
    pytest.mark.skipif(not shutil.which("nft"), reason="nftables (nft) is not installed"),
    pytest.mark.skipif(not shutil.which("ip"), reason="iproute2 (ip) is not installed"),
    pytest.mark.skipif(not os.access(TASK_PY, os.X_OK), reason=f"{TASK_PY} is missing"),
]

# Tries each (what, host, port) and says what happened: "answered: <first line>",
# or the error's name.
PROBE = r"""
import json, socket, sys
found = {}
for what, host, port in json.loads(sys.argv[1]):
    try:
        with socket.create_connection((host, port), timeout=2) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            found[what] = "answered: " + conn.recv(200).decode(errors="replace").split("\n")[-1]
    except OSError as exc:
        found[what] = type(exc).__name__
print(json.dumps(found), flush=True)
"""

# Answers every connection with one line: what it is (argv[1]); listens on argv[2] or
# $PORT, on every address.
LISTENER = r"""
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[2]) if len(sys.argv) > 2 else int(os.environ["PORT"])))
s.listen(64)
print("listening", flush=True)
while True:
    conn, _ = s.accept()
    conn.recv(4096)
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (
        len(sys.argv[1]), sys.argv[1].encode()))
    conn.close()
"""


def probe_argv(targets: list[tuple[str, str, int]]) -> list[str]:
    return [TASK_PY, "-c", textwrap.dedent(PROBE), json.dumps(targets)]


@pytest.fixture(scope="module")
def outside():
    """(address, port) of a listener off this machine's own addresses (in a network
    namespace of its own, routed to over a veth), the machine's address there, the
    namespace, and a second address of it."""
    tag = f"{os.getpid() % 100000}"
    space, host_end, far_end = f"gppout{tag}", f"gppo{tag}", f"gppi{tag}"
    net = random.randrange(1, 8000) * 8
    ours, theirs, another = (f"10.251.{net // 256}.{net % 256 + i}" for i in (1, 2, 3))
    steps = [
        f"ip netns add {space}",
        f"ip link add {host_end} type veth peer name {far_end}",
        f"ip link set {far_end} netns {space}",
        f"ip addr add {ours}/29 dev {host_end}",
        f"ip link set {host_end} up",
        f"ip -n {space} addr add {theirs}/29 dev {far_end}",
        f"ip -n {space} addr add {another}/29 dev {far_end}",
        f"ip -n {space} link set {far_end} up",
        f"ip -n {space} link set lo up",
    ]
    try:
        for step in steps:
            subprocess.run(step.split(), check=True, capture_output=True)
    except subprocess.CalledProcessError as exc:
        subprocess.run(["ip", "netns", "del", space], capture_output=True)
        pytest.skip(f"cannot make a network namespace: {exc.stderr.decode().strip()}")
    listener = subprocess.Popen(
        ["ip", "netns", "exec", space, TASK_PY, "-c", LISTENER, "outside", "8080"],
        stdout=subprocess.PIPE,
    )
    assert listener.stdout is not None and listener.stdout.readline() == b"listening\n"
    yield theirs, 8080, ours, space, another
    listener.kill()
    listener.wait()
    subprocess.run(["ip", "netns", "del", space], capture_output=True)
    subprocess.run(["ip", "link", "del", host_end], capture_output=True)


@pytest.fixture(scope="module")
def provider(tmp_path_factory):
    root = tmp_path_factory.mktemp("network")
    port, gateway_port = free_port(), free_port()
    home = make_home(root / "home", port, task_users="pool", gateway_port=gateway_port)
    assert 'network = "isolated"' in home.config.read_text()  # the default
    with running(home, port) as started:
        started.gateway = f"http://127.0.0.1:{gateway_port}"
        facts = started.api.get("/nodes").json()[0]["facts"]["isolation"]
        assert facts["network"].startswith("isolated:"), facts
        yield started


def as_user(uid: int, argv: list[str]) -> dict:
    """What `argv` (the probe) prints, run on the host as `uid`: a local user that is not
    the gateway."""

    def become() -> None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)

    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, preexec_fn=become)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def printed(provider, client: httpx.Client, spec: dict) -> dict:
    made = client.post("/tasks", json=spec)
    assert made.status_code == 201, made.text
    task_id = made.json()["id"]
    assert provider.wait_state(task_id, {"succeeded", "failed"}, 60)["exit_code"] == 0
    return json.loads(provider.logs(task_id).strip().splitlines()[-1])


def test_a_private_replica_answers_only_through_the_gateway(provider, outside):
    service = provider.submit(
        name="private",
        kind="service",
        command=[TASK_PY, "-c", LISTENER, "the-replica"],
        ports=["http"],
        serve={"name": "private"},
    )
    wait_for(
        lambda: provider.api.get("/services/private").json().get("replicas_ready") == 1,
        60,
        "the replica ready",
    )
    replica = provider.task(service["id"])["allocation"]["ports"]["http"]
    # a job of the same tenant listening on a port it never declared
    job_port = free_port()
    job = provider.submit(command=[TASK_PY, "-c", LISTENER, "a-job", str(job_port)])
    provider.wait_state(job["id"], "running")
    wait_for(lambda: "listening" in provider.logs(job["id"]), what="the job listening")

    # the gateway, with the provider's token, is served
    through = httpx.get(
        f"{provider.gateway}/s/private/",
        headers={"Authorization": f"Bearer {provider.token}"},
        timeout=10,
    )
    assert through.status_code == 200 and through.text == "the-replica"

    targets = [
        ("replica", "127.0.0.1", replica),
        ("replica by the machine's address", outside[2], replica),
        ("job", "127.0.0.1", job_port),
        ("outside", outside[0], outside[1]),
    ]
    # another tenant's task: neither port, but it reaches the outside
    other = provider.tenant("intruder")
    seen = printed(provider, other, {"command": probe_argv(targets)})
    assert seen["replica"] == "ConnectionRefusedError"  # a declared port: refused at once
    assert seen["replica by the machine's address"] == "ConnectionRefusedError"
    assert seen["job"] in ("TimeoutError", "ConnectionRefusedError")  # its answer dropped
    assert seen["outside"] == "answered: outside"
    # a process on the host that is not the gateway (nor root)
    local = as_user(NOBODY, probe_argv(targets[:3]))
    assert local == {
        "replica": "ConnectionRefusedError",
        "replica by the machine's address": "ConnectionRefusedError",
        "job": "TimeoutError",
    }
    # the provider (root: its daemon, its gateway) still reaches both
    assert as_user(0, probe_argv(targets[:3])) == {
        "replica": "answered: the-replica",
        "replica by the machine's address": "answered: the-replica",
        "job": "answered: a-job",
    }


@pytest.fixture
def offline(tmp_path):
    home = tmp_path / "offline"
    processes = LocalProcesses(
        home, isolation=Settings(users="pool", cgroups="none", devices="none", network="none")
    )
    yield processes
    kill_processes_mentioning(home)
    for record in home.glob("*/isolation-*.json"):
        if applied := Applied.load(str(record)):
            undo(applied)


@pytest.fixture
def root_service():
    """A service of the host's own, run by root, on the loopback."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", LISTENER, "root's", str(port)], stdout=subprocess.PIPE
    )
    assert server.stdout is not None and server.stdout.readline() == b"listening\n"
    yield port
    server.kill()
    server.wait()


def test_a_task_with_no_network_reaches_only_itself(offline, outside, root_service, tmp_path):
    assert offline.isolation.describe()["network"].startswith("no network:")
    own = free_port()
    code = f"""
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", {LISTENER!r}, "itself", "{own}"])
time.sleep(0.5)
exec({textwrap.dedent(PROBE)!r})
"""
    targets = [("itself", "127.0.0.1", own), ("host", "127.0.0.1", root_service)]
    targets.append(("outside", outside[0], outside[1]))
    run_dir = tmp_path / "offline" / "t-1"
    handle = offline.start(
        Launch(
            task_id="t-offline",
            attempt=1,
            argv=[TASK_PY, "-c", code, json.dumps(targets)],
            env={},
            workdir=str(run_dir / "work"),
            run_dir=str(run_dir),
        )
    )
    wait_for(lambda: offline.poll(handle), 60, "the task to end")
    lines = (run_dir / "output.log").read_text().strip().splitlines()
    seen = json.loads(lines[-1])
    assert seen["itself"] == "answered: itself"
    assert seen["host"] == "TimeoutError"  # a service of the host's: its answer dropped
    assert seen["outside"] in ("OSError", "ConnectionRefusedError")  # rejected at once
    # its rules went with it (just after its end was recorded)
    applied = Applied.load(str(run_dir / "isolation-1.json"))
    assert applied is not None and applied.network == "none"
    wait_for(lambda: str(applied.uid) not in network.listed("offline"), what="rules lifted")


def test_a_ray_provider_lets_in_its_own_machine(outside):
    """What the Ray backend sends its nodes as peers: this machine's addresses, not
    loopback."""
    found = machine_addresses()
    assert outside[2] in found and "127.0.0.1" not in found and "::1" not in found


def test_the_table_is_the_machines_and_made_once(monkeypatch):
    assert network.ready() == "" and network.ready() == ""
    # gone (a firewall reload that flushed the ruleset): the next start makes it again;
    # tried on a table of the test's own, the machine's guards what runs beside it
    monkeypatch.setattr(network, "TABLE", f"gpuprovider_test_{os.getpid()}")
    try:
        assert network.ready() == ""
        subprocess.run(["nft", "delete", "table", "inet", network.TABLE], check=True)
        network.guard(4_000_000_001, [], "isolated")
        assert "4000000001" in network.listed("isolated")
    finally:
        subprocess.run(["nft", "delete", "table", "inet", network.TABLE], capture_output=True)
    monkeypatch.undo()
    listed = subprocess.run(
        ["nft", "list", "chain", "inet", network.TABLE, "output"], capture_output=True, text=True
    )
    assert listed.stdout.count("jump answer") == 1  # made once, however many providers
    assert Path(network.LOCK).exists()


def test_on_a_ray_node_a_replica_answers_the_providers_machine_and_no_other(outside, tmp_path):
    """A Ray node's agent runs tasks as the local backend does; the provider's machine
    (its gateway) is a peer off the node: it alone of the network is answered."""
    peer, _, node_address, space, stranger = outside
    home = tmp_path / "ray-node"
    processes = LocalProcesses(
        home,
        isolation=Settings(users="pool", cgroups="none", devices="none", network_peers=(peer,)),
    )
    try:
        run_dir = home / "t-1"
        handle = processes.start(
            Launch(
                task_id="t-replica",
                attempt=1,
                argv=[TASK_PY, "-c", LISTENER, "on-a-node"],
                env={},
                workdir=str(run_dir / "work"),
                run_dir=str(run_dir),
                port_names=["http"],
                port_range=(free_port(), 65000),
            )
        )
        log = run_dir / "output.log"
        wait_for(lambda: log.exists() and "listening" in log.read_text(), what="listening")
        port = handle.ports["http"]

        def from_(source: str) -> str:
            code = (
                "import socket, sys\n"
                "s = socket.socket(); s.settimeout(2); s.bind((sys.argv[1], 0))\n"
                "try:\n"
                "    s.connect((sys.argv[2], int(sys.argv[3]))); s.sendall(b'GET /')\n"
                "    print(s.recv(200).decode().split('\\n')[-1])\n"
                "except OSError as exc:\n"
                "    print(type(exc).__name__)\n"
            )
            argv = ["ip", "netns", "exec", space, TASK_PY, "-c", code]
            argv += [source, node_address, str(port)]
            return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout.strip()

        assert from_(peer) == "on-a-node"  # the provider's machine: its gateway
        assert from_(stranger) == "TimeoutError"  # anyone else on the network
        processes.stop(handle)
        wait_for(lambda: processes.poll(handle), 30, "the replica to end")
    finally:
        kill_processes_mentioning(home)
        for record in home.glob("*/isolation-*.json"):
            if applied := Applied.load(str(record)):
                undo(applied)
        subprocess.run(
            ["nft", "delete", "element", "inet", network.TABLE, "peers4", f"{{ {peer} }}"],
            capture_output=True,
        )
