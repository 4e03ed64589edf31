"""`gpuprovider fleet` against a real sshd (Debian's openssh-server) on 127.0.0.1: its
own host key, an authorized key made here, every "host" this machine with its own
prefix and unit folder. systemd does not run here as PID 1: units are written, checked
with `systemd-analyze verify` and enabled, not started (the fleet says so)."""

from __future__ import annotations

import asyncio
import dataclasses
import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gpuprovider.fleet import deploy, units
from gpuprovider.fleet.inventory import InventoryError, from_targets, load
from gpuprovider.fleet.remote import KnownHosts
from gpuprovider.testing import GPUPROVIDER, SSHD, Sshd, free_port, keygen

HAS_SSHD = Path(SSHD).exists() and os.geteuid() == 0  # sshd's privilege separation
needs_sshd = pytest.mark.skipif(
    not HAS_SSHD, reason="needs root and openssh-server's sshd (make test installs it)"
)
USER = getpass.getuser()
WHEELHOUSE = Path(os.environ.get("GPUPROVIDER_TEST_WHEELHOUSE", "/tmp/gpuprovider-test-wheels"))


class Listener:
    """A TCP port that counts connections: a stand-in Ray head (the host check only
    reaches it) and a witness that nothing connected."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    client_key = root / "client_key"
    public = keygen(client_key)
    sshd = Sshd(root / "sshd", public) if HAS_SSHD else None
    head = Listener()
    yield {"root": root, "key": client_key, "sshd": sshd, "head": head}
    if sshd is not None:
        sshd.stop()
    head.close()


def run_cli(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPUPROVIDER_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run(
        [GPUPROVIDER, *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def inventory(path: Path, world, hosts: list[dict], **top) -> Path:
    lines = [f"head: 127.0.0.1:{world['head'].port}"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in top.items()]
    lines.append("hosts:")
    for host in hosts:
        first = True
        for key, value in host.items():
            lines.append(f"  {'- ' if first else '  '}{key}: {json.dumps(value)}")
            first = False
    path.write_text("\n".join(lines) + "\n")
    return path


def host(world, name: str, **fields) -> dict:
    made = {
        "host": "127.0.0.1",
        "name": name,
        "user": USER,
        "port": world["sshd"].port,
        "key": str(world["key"]),
        "prefix": str(world["root"] / name / "opt"),
        "unit_dir": str(world["root"] / name / "units"),
        "simulate_gpus": ["h100-80gb-sxm:2"],
    }
    made.update(fields)
    return made


def pin(home: Path, world) -> None:
    known = home / "fleet" / "known_hosts"
    known.parent.mkdir(parents=True, exist_ok=True)
    known.write_text(world["sshd"].known_line())


# -- hostile inventories: refused naming the line and field, nothing run ---------------


HOSTILE = {
    "bad YAML": ("hosts:\n  - host: a\n\t- host: b\n", ":3: not valid YAML"),
    "unknown key": (
        "hosts:\n  - host: a.example\n    lables: {zone: eu}\n",
        ":3: hosts.0.lables: unknown key",
    ),
    "duplicate name": (
        "hosts:\n  - host: a.example\n    name: n1\n  - host: b.example\n    name: n1\n",
        ":4: name 'n1' is used twice",
    ),
    "bad port": ("hosts:\n  - host: a.example\n    port: 70000\n", ":3: hosts.0.port:"),
    "host is an option": (
        "hosts:\n  - host: -oProxyCommand=touch /tmp/pwned\n",
        ":2: hosts.0.host:",
    ),
    "label with shell": (
        "hosts:\n  - host: a.example\n    labels: {zone: 'eu;touch /tmp/pwned'}\n",
        ":3: hosts.0.labels:",
    ),
    "prefix with shell": (
        "hosts:\n  - host: a.example\n    prefix: /opt/$(reboot)\n",
        ":3: hosts.0.prefix:",
    ),
    "duplicate key": (
        "hosts:\n  - host: a.example\n    host: b.example\n",
        ":3: key 'host' appears twice",
    ),
    "jump is an option": ("hosts:\n  - host: a.example\n    jump: -J\n", ":3: hosts.0.jump"),
    "unknown top key": ("hots: []\nhosts:\n  - host: a\n", ":1: hots: unknown key"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_inventory_is_refused_naming_the_line_before_any_connection(
    case, tmp_path, world
):
    text, said = HOSTILE[case]
    # a valid first host that would be reached if anything ran: the listener counts
    witness = f"hosts:\n  - host: 127.0.0.1\n    port: {world['head'].port}\n"
    path = tmp_path / "fleet.yaml"
    body = text.replace("hosts:\n", witness, 1) if "hosts:\n" in text else text
    path.write_text(body)
    before = world["head"].accepted
    done = run_cli(tmp_path / "home", "fleet", "add", "-f", str(path), "--head", "127.0.0.1:1")
    assert done.returncode == 2, done.stdout + done.stderr
    expected = said.split(":", 2)
    line = int(expected[1])
    if line > text.splitlines().index("hosts:") + 1:
        line += 2  # the witness' two lines come first
    field = expected[2].strip().replace("hosts.0.", "hosts.1.")
    assert f"fleet.yaml:{line}: {field}" in done.stderr, done.stderr
    assert world["head"].accepted == before
    assert not (tmp_path / "home" / "fleet" / "hosts.json").exists()


def test_a_world_readable_key_and_option_like_hosts_are_refused(tmp_path):
    key = tmp_path / "key"
    key.write_text("not a key")
    key.chmod(0o644)
    path = tmp_path / "fleet.yaml"
    path.write_text(f"hosts:\n  - host: a.example\n    key: {key}\n")
    with pytest.raises(InventoryError, match=r"fleet.yaml:3: key .* readable by others"):
        load(path)
    for target in ("-oProxyCommand=x", "root@a;b", "a.example:0", "a b", "$(x)"):
        with pytest.raises(InventoryError, match="host"):
            from_targets([target])
    done = run_cli(tmp_path / "home", "fleet", "add", "--head", "127.0.0.1:1", "--", "-oX=y")
    assert done.returncode == 2 and "looks like an option" in done.stderr


# -- host keys ----------------------------------------------------------------------------


@needs_sshd
def test_an_unknown_host_is_refused_unless_accept_new_pins_it(tmp_path, world):
    home = tmp_path / "home"
    path = inventory(tmp_path / "fleet.yaml", world, [host(world, "h1")])
    refused = run_cli(home, "fleet", "add", "-f", str(path), "--check")
    assert refused.returncode == 1
    assert "host key of" in refused.stdout and "is not known" in refused.stdout
    pinned = run_cli(home, "fleet", "add", "-f", str(path), "--check", "--accept-new")
    assert pinned.returncode == 0, pinned.stdout + pinned.stderr
    assert "host key pinned" in pinned.stdout
    known = (home / "fleet" / "known_hosts").read_text()
    assert known == world["sshd"].known_line()
    assert "Python 3.11" in pinned.stdout or "Python 3." in pinned.stdout


@needs_sshd
def test_a_changed_host_key_is_refused_even_with_accept_new(tmp_path, world):
    home = tmp_path / "home"
    other = keygen(tmp_path / "other_host_key").split()
    known = home / "fleet" / "known_hosts"
    known.parent.mkdir(parents=True)
    known.write_text(f"[127.0.0.1]:{world['sshd'].port} {other[0]} {other[1]}\n")
    path = inventory(tmp_path / "fleet.yaml", world, [host(world, "h1")])
    done = run_cli(home, "fleet", "add", "-f", str(path), "--check", "--accept-new")
    assert done.returncode == 1
    assert "REFUSED: its host key is not the one known for it" in done.stdout
    assert known.read_text().count("\n") == 1  # nothing pinned over it


# -- failures per host, the others go on ----------------------------------------------------


@needs_sshd
def test_a_failing_host_is_reported_with_its_step_and_the_others_go_on(tmp_path, world):
    home = tmp_path / "home"
    pin(home, world)
    old_python = tmp_path / "python3.9"  # a host whose Python is not the provider's
    old_python.write_text(
        f"#!{sys.executable}\nimport sys\n"
        "probe = sys.argv[2].replace('sys.version_info[:2]', '(3, 9)')\n"
        "sys.argv = [sys.argv[0], *sys.argv[3:]]\nexec(probe)\n"
    )
    old_python.chmod(0o755)
    hosts = [
        host(world, "good"),
        host(world, "unreachable", port=free_port()),
        host(world, "old-python", python=str(old_python)),
        host(world, "no-python", python="/nonexistent/python3"),
    ]
    path = inventory(tmp_path / "fleet.yaml", world, hosts)
    done = run_cli(home, "fleet", "add", "-f", str(path), "--check", "--parallel", "2")
    assert done.returncode == 1
    out = done.stdout
    assert "good  check     ok" in out
    assert "unreachable  connect   FAIL  cannot connect to [127.0.0.1]:" in out
    assert "old-python  check     FAIL" in out and "is Python 3.9; the node needs Python" in out
    assert "no-python  check     FAIL  no /nonexistent/python3 on the host" in out
    # the summary: one row per host, the step each failed at
    summary = out[out.index("Fleet: checked") :]
    for name, step in (("unreachable", "connect"), ("old-python", "check"), ("no-python", "check")):
        row = next(line for line in summary.splitlines() if line.strip().startswith(name))
        assert "FAILED" in row and step in row
    row = next(line for line in summary.splitlines() if line.strip().startswith("good"))
    assert " ok " in row
    records = json.loads((home / "fleet" / "hosts.json").read_text())
    assert records["unreachable"]["state"] == "check failed at connect"


# -- the whole install ----------------------------------------------------------------------


@needs_sshd
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_add_installs_the_providers_versions_writes_config_and_unit_then_upgrade_and_remove(
    tmp_path, world
):
    """The provider's wheel and every dependency repacked here, copied over SSH, installed
    into a fresh venv on the host with no index; node.toml and a verified, enabled unit
    whose command runs; then an upgrade (only gpuprovider's own wheel goes again) and a
    removal."""
    home = tmp_path / "home"
    pin(home, world)
    spec = host(world, "gpu-01", labels={"zone": "eu"}, python="/usr/bin/python3")
    # a host whose connection is cut in the middle of the install: its Python, asked to
    # make the venv, kills the sshd process that serves the connection
    cutter = tmp_path / "python3"
    cutter.write_text(
        "#!/usr/bin/python3\nimport os, signal, sys\n"
        "if sys.argv[1:3] == ['-m', 'venv']:\n"
        "    pid = os.getpid()\n"
        "    while pid > 1:\n"
        "        pid = int(open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[1])\n"
        "        if b'@' in open(f'/proc/{pid}/cmdline', 'rb').read():\n"
        "            os.kill(pid, signal.SIGKILL)\n"
        "            break\n"
        "os.execv('/usr/bin/python3', ['/usr/bin/python3', *sys.argv[1:]])\n"
    )
    cutter.chmod(0o755)
    cut = host(world, "cut-off", python=str(cutter))
    path = inventory(tmp_path / "fleet.yaml", world, [spec, cut])
    WHEELHOUSE.mkdir(exist_ok=True)
    add = ["fleet", "add", "-f", str(path), "--no-wait", "--wheelhouse", str(WHEELHOUSE)]
    done = run_cli(home, *add, timeout=1100)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "cut-off  venv      FAIL  the connection broke" in done.stdout, done.stdout
    row = next(line for line in done.stdout.splitlines() if line.strip().startswith("gpu-01"))
    assert " ok " in row and "FAILED" not in row
    prefix = Path(spec["prefix"])
    version = subprocess.run(
        [prefix / "venv" / "bin" / "gpuprovider", "--version"], capture_output=True, text=True
    )
    assert version.returncode == 0, version.stderr
    config = units.NodeConfig.read(prefix / "node.toml")
    assert config.name == "gpu-01" and config.labels == {"zone": "eu"}
    assert config.simulate_gpus == ["h100-80gb-sxm:2"]
    unit = Path(spec["unit_dir"]) / "gpuprovider-node.service"
    assert f"ExecStart={prefix}/venv/bin/gpuprovider node join --config {prefix}/node.toml" in (
        unit.read_text()
    )
    assert (Path(spec["unit_dir"]) / "multi-user.target.wants" / unit.name).resolve() == unit
    assert "verified, enabled, NOT started: systemd does not run on the host" in done.stdout
    # what systemd would start, started by the test: it reads node.toml and reaches the
    # head (a plain TCP port here, so it is told that is no Ray head)
    start = units.node_exec_start(from_targets(["127.0.0.1"], {"prefix": str(prefix)}).hosts[0])
    ran = subprocess.run([*start[:-1], "--dry-run"], capture_output=True, text=True, timeout=120)
    assert "is not a Ray head" in ran.stderr, ran.stdout + ran.stderr
    listed = run_cli(home, "fleet", "list")
    assert "gpu-01" in listed.stdout and "installed, not started" in listed.stdout
    said = run_cli(home, "fleet", "exec", "gpu-01", "--", "cat", str(prefix / "node.toml"))
    assert said.returncode == 0 and 'name = "gpu-01"' in said.stdout
    upgraded = run_cli(
        home, "fleet", "upgrade", "--no-wait", "--wheelhouse", str(WHEELHOUSE), timeout=600
    )
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert "0 to install" in upgraded.stdout
    removed = run_cli(home, "fleet", "remove", "gpu-01", "--no-wait")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert not unit.exists() and not (prefix / "node.toml").exists()
    assert not (Path(spec["unit_dir"]) / "multi-user.target.wants" / unit.name).is_symlink()
    assert "gpu-01" not in run_cli(home, "fleet", "list").stdout


def test_install_service_writes_a_unit_systemd_analyze_finds_clean(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("needs systemd-analyze (package systemd)")
    for extra in ([], ["--hub"]):
        done = run_cli(
            tmp_path / "home", "install-service", "--unit-dir", str(tmp_path / "units"), *extra
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "systemd-analyze verify: clean" in done.stdout
    unit = (tmp_path / "units" / "gpuprovider.service").read_text()
    assert f"Environment=GPUPROVIDER_HOME={tmp_path / 'home'}" in unit
    assert unit.count("ExecStart=") == 1 and unit.rstrip().endswith("WantedBy=multi-user.target")
    assert (tmp_path / "units" / "multi-user.target.wants" / "gpuprovider.service").is_symlink()
    assert "hub serve" in (tmp_path / "units" / "gpuprovider-hub.service").read_text()
    nobody = run_cli(tmp_path / "home", "install-service", "--user", "no-such-user", "--print")
    assert nobody.returncode == 2 and "useradd --system" in nobody.stderr
    for hostile in ("root\nExecStartPre=/bin/sh -c id", "a b", "$(id)"):
        refused = run_cli(tmp_path / "home", "install-service", "--user", hostile, "--print")
        assert refused.returncode == 2 and "--user" in refused.stderr, refused.stderr


@needs_sshd
def test_a_host_behind_a_jump_host_is_reached_through_it(tmp_path, world):
    home = tmp_path / "home"
    pin(home, world)
    jump = f"{USER}@127.0.0.1:{world['sshd'].port}"
    path = inventory(tmp_path / "fleet.yaml", world, [host(world, "behind", jump=jump)])
    done = run_cli(home, "fleet", "add", "-f", str(path), "--check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "via 127.0.0.1" in done.stdout and "behind  check     ok" in done.stdout


# -- the rolling order and the wait for ready, with a provider API that records ----------


class FakeApi:
    def __init__(self, ready_after: int = 0) -> None:
        self.calls: list[tuple[str, str]] = []
        self.ready_after = ready_after

    def node_status(self, name):
        self.calls.append(("status", name))
        asked = sum(1 for c in self.calls if c == ("status", name))
        return "ready" if asked > self.ready_after else None

    def drain(self, name):
        self.calls.append(("drain", name))

    def resume(self, name):
        self.calls.append(("resume", name))

    def remove(self, name):
        self.calls.append(("remove", name))

    def running_on(self, name):
        return 0


def test_a_rolling_upgrade_keeps_at_most_max_unavailable_out_and_stops_at_a_failure():
    hosts = [from_targets([f"h{i}.example"]).hosts[0] for i in range(7)]
    out: set[str] = set()
    most = 0
    ran: list[str] = []

    async def work(h):
        nonlocal most
        out.add(h.name)
        most = max(most, len(out))
        await asyncio.sleep(0.01)
        out.discard(h.name)
        ran.append(h.name)
        return deploy.Outcome(h.name, ok=h.name != "h3.example", seconds=0.01)

    outcomes = asyncio.run(deploy.rolling(hosts, 2, work))
    assert most == 2
    assert sorted(ran) == ["h0.example", "h1.example", "h2.example", "h3.example"]
    assert [o.ok for o in outcomes] == [True, True, True, False, False, False, False]
    assert outcomes[-1].reason == "not upgraded: an earlier host failed"


def test_ready_waits_for_the_node_in_node_list_with_a_bound(tmp_path):
    h = from_targets(["gpu-07.example"]).hosts[0]
    plan = deploy.Plan(
        head="127.0.0.1:1",
        known=KnownHosts(tmp_path / "k"),
        accept_new=False,
        wheel_dir=tmp_path,
        api=FakeApi(ready_after=2),
        ready_timeout_s=30,
    )
    said, _ = asyncio.run(deploy._ready(h, plan, started=True))
    assert said == "node gpu-07.example is ready"
    plan.api = FakeApi(ready_after=10**6)
    plan.ready_timeout_s = 1.5
    with pytest.raises(deploy.StepFailed, match=r"is not in `node list` after 1\.5s"):
        asyncio.run(deploy._ready(h, plan, started=True))
    said, _ = asyncio.run(deploy._ready(h, plan, started=False))
    assert said == "not waited for: the unit was not started"


@needs_sshd
def test_remove_drains_the_node_first_stops_its_unit_then_forgets_it(tmp_path, world):
    spec = host(world, "leaving")
    unit_dir = Path(spec["unit_dir"])
    wants = unit_dir / "multi-user.target.wants"
    wants.mkdir(parents=True)
    (unit_dir / "gpuprovider-node.service").write_text("[Unit]\n")
    (wants / "gpuprovider-node.service").symlink_to("../gpuprovider-node.service")
    Path(spec["prefix"]).mkdir(parents=True)
    (Path(spec["prefix"]) / "node.toml").write_text("")
    fields = {k: v for k, v in spec.items() if k not in ("host", "user", "port")}
    target = f"{USER}@127.0.0.1:{world['sshd'].port}"
    leaving = dataclasses.replace(from_targets([target], fields).hosts[0], name="leaving")
    known = tmp_path / "known_hosts"
    known.write_text(world["sshd"].known_line())
    api = FakeApi()
    plan = deploy.Plan(
        head="", known=KnownHosts(known, []), accept_new=False, wheel_dir=tmp_path, api=api
    )
    steps: list[tuple[str, str]] = []
    outcome = asyncio.run(
        deploy.remove_host(leaving, plan, lambda h, s, st, d: steps.append((s, st)), purge=False)
    )
    assert outcome.ok, outcome
    assert steps == [("drain", "ok"), ("connect", "ok"), ("stop", "ok"), ("forget", "ok")]
    assert [c for c in api.calls if c[0] != "status"] == [
        ("drain", "leaving"),
        ("remove", "leaving"),
    ]
    assert not (unit_dir / "gpuprovider-node.service").exists()
    assert not (wants / "gpuprovider-node.service").is_symlink()
    assert not (Path(spec["prefix"]) / "node.toml").exists()


def test_node_join_reads_its_config_and_refuses_a_bad_one(tmp_path):
    good = tmp_path / "node.toml"
    h = from_targets(["gpu-07.example"], {"labels": {"zone": "eu"}}).hosts[0]
    good.write_text(units.node_config(h, "127.0.0.1:1").toml())
    assert units.NodeConfig.read(good).labels == {"zone": "eu"}
    done = run_cli(tmp_path / "home", "node", "join", "--config", str(good), "--dry-run")
    assert done.returncode == 1 and "nothing answers at 127.0.0.1:1" in done.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('head = "127.0.0.1:1"\nname = "x;reboot"\n')
    done = run_cli(tmp_path / "home", "node", "join", "--config", str(bad))
    assert done.returncode == 2 and "bad.toml: name:" in done.stderr, done.stderr
    both = run_cli(tmp_path / "home", "node", "join", "127.0.0.1:1", "--config", str(good))
    assert both.returncode == 2 and "--config says everything" in both.stderr
