"""Adding, upgrading and removing the hosts of a fleet: named steps per host, hosts in
parallel with a bound, a host that fails a step reported with the step and what the
host said while the others go on.

The provider's API is reached through `ProviderApi` (the CLI gives its client): this
module decides the steps, never how the API is called."""

from __future__ import annotations

import asyncio
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from gpuprovider import __version__
from gpuprovider.fleet import units, wheelhouse
from gpuprovider.fleet.inventory import NODE_UNIT, Host, Jump
from gpuprovider.fleet.remote import KnownHosts, RemoteError, Session


class Step(StrEnum):
    CONNECT = "connect"
    CHECK = "check"
    DRAIN = "drain"
    VENV = "venv"
    WHEELS = "wheels"
    INSTALL = "install"
    INVENTORY = "inventory"
    CONFIG = "config"
    UNIT = "unit"
    READY = "ready"
    RESUME = "resume"
    STOP = "stop"
    FORGET = "forget"


class ProviderApi(Protocol):
    """What the fleet asks of the provider's API."""

    def node_status(self, name: str) -> str | None: ...  # None: no such node
    def drain(self, name: str) -> None: ...
    def resume(self, name: str) -> None: ...
    def remove(self, name: str) -> None: ...
    def running_on(self, name: str) -> int: ...  # tasks still running on the node


# (host name, step, "ok" | "fail" | "skip", detail)
Reporter = Callable[[str, str, str, str], None]


class StepFailed(Exception):
    def __init__(self, reason: str, output: str = "") -> None:
        super().__init__(reason)
        self.output = output


@dataclass
class Outcome:
    host: str
    ok: bool = False
    failed_step: str | None = None
    reason: str = ""
    output: str = ""
    version: str = ""
    started: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    head: str
    known: KnownHosts
    accept_new: bool
    wheel_dir: Path
    api: ProviderApi | None = None  # None: do not wait for `ready`, do not drain
    parallel: int = 8
    check_only: bool = False
    ready_timeout_s: float = 180.0
    drain_timeout_s: float = 3600.0
    min_disk_gib: float = 2.0
    max_skew_s: float = 1.0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _own: Path | None = None

    async def own_wheel(self) -> Path:
        async with self._lock:
            if self._own is None:
                self._own = await asyncio.to_thread(wheelhouse.own_wheel, self.wheel_dir)
            return self._own

    async def wheels(self, names: list[str]) -> list[Path]:
        async with self._lock:  # one builder at a time: hosts share the cache
            return await asyncio.to_thread(wheelhouse.wheels_for, names, self.wheel_dir)


# What the host says about itself, with its own Python (before anything is installed).
PROBE = r"""
import json, os, shutil, socket, subprocess, sys, time, platform
prefix, head = sys.argv[1], sys.argv[2]
where = prefix
while not os.path.exists(where):
    where = os.path.dirname(where) or "/"
os_name = ""
try:
    for line in open("/etc/os-release"):
        if line.startswith("PRETTY_NAME="):
            os_name = line.split("=", 1)[1].strip().strip('"')
except OSError:
    pass
driver = ""
if shutil.which("nvidia-smi"):
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
            "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.split()[0]
    except Exception as exc:
        driver = "error: %s" % exc
host, _, port = head.rpartition(":")
try:
    socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
    head_ok = ""
except OSError as exc:
    head_ok = exc.strerror or str(exc)
try:
    import ensurepip, venv
    has_venv = True
except ImportError:
    has_venv = False
print(json.dumps({
    "python": "%d.%d" % sys.version_info[:2], "machine": platform.machine(), "os": os_name,
    "time": time.time(), "free_gib": shutil.disk_usage(where).free / 2**30,
    "driver": driver, "head": head_ok, "venv": has_venv,
    "systemd": os.path.isdir("/run/systemd/system"),
    "verify": bool(shutil.which("systemd-analyze")),
}))
"""

INSTALLED = (
    "import json, importlib.metadata as m, re; print(json.dumps({re.sub(r'[-_.]+', '-', "
    "d.metadata['Name']).lower(): d.version for d in m.distributions() if d.metadata['Name']}))"
)

VERSIONS = (
    "import json, gpuprovider, ray; print(json.dumps([gpuprovider.__version__, ray.__version__]))"
)

# The node's hardware through the same inventory code as `gpuprovider check`.
HARDWARE = (
    "import json; from gpuprovider.inventory.local import read_nvml; r = read_nvml('fleet'); "
    "print(json.dumps({'gpus': len(r.gpus), 'driver': r.driver_version, "
    "'cuda': r.cuda_version, 'why': r.unavailable_reason}))"
)


async def _check(session: Session, host: Host, plan: Plan) -> tuple[str, tuple[bool, bool]]:
    """The host may run a node: its OS, Python, disk, clock, driver, reach to the head.
    Returns what was found, and whether systemd runs there and can verify a unit."""
    before = time.time()
    done = await session.run([host.python, "-c", PROBE, host.prefix, plan.head], timeout_s=60)
    after = time.time()
    if done.exit_status == 127:
        raise StepFailed(f"no {host.python} on the host: install Python {_python()}", done.output)
    if done.exit_status != 0:
        raise StepFailed(f"{host.python} could not describe the host", done.output)
    try:
        found = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise StepFailed("the host's answer was not JSON", done.output) from None
    if found["python"] != _python():
        raise StepFailed(
            f"{host.python} is Python {found['python']}; the node needs Python {_python()}, "
            f"the provider's own (its wheels are built for it): install python{_python()} "
            "and set `python:` for this host"
        )
    if found["machine"] != platform.machine():
        raise StepFailed(
            f"the host is {found['machine']}, the provider {platform.machine()}: "
            "its wheels would not run there"
        )
    if not found["venv"]:
        raise StepFailed(f"{host.python} cannot make a venv: install python3-venv")
    if found["free_gib"] < plan.min_disk_gib:
        raise StepFailed(
            f"{found['free_gib']:.1f} GiB free under {host.prefix}; "
            f"the node needs {plan.min_disk_gib:g} GiB"
        )
    skew = found["time"] - (before + after) / 2
    if abs(skew) > plan.max_skew_s + (after - before) / 2:
        raise StepFailed(
            f"the host's clock is {skew:+.1f}s off the provider's (at most "
            f"{plan.max_skew_s:g}s: leases and signed requests depend on it); run NTP (chrony)"
        )
    if found["head"]:
        raise StepFailed(
            f"the host cannot reach the Ray head at {plan.head} ({found['head']}); "
            "open the head's ports to it"
        )
    gpu = f"driver {found['driver']}" if found["driver"] else "no NVIDIA driver"
    if not found["driver"] and not host.simulate_gpus:
        gpu += " (no GPU to sell)"
    detail = (
        f"{found['os'] or 'Linux'} {found['machine']}, Python {found['python']}, "
        f"{found['free_gib']:.0f} GiB free, clock {skew:+.2f}s, {gpu}, head reachable"
    )
    return detail, (bool(found["systemd"]), bool(found["verify"]))


def _python() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


async def _install(session: Session, host: Host, plan: Plan, report: Reporter) -> str:
    """venv, wheels, install: the provider's exact versions; returns gpuprovider's."""
    await _step(report, host, Step.VENV, _venv(session, host))
    wanted: dict[str, str] = {}

    async def upload() -> tuple[str, list[str]]:
        try:
            wanted.update(wheelhouse.closure())
            answer = await session.check([f"{host.venv}/bin/python", "-c", INSTALLED], 60)
            have = json.loads(answer.strip().splitlines()[-1])
            needed = sorted(
                n for n, v in wanted.items() if n != wheelhouse.ROOT and have.get(n) != v
            )
            own = await plan.own_wheel()
            files = [*(await plan.wheels(needed)), own]
        except wheelhouse.WheelhouseError as exc:
            raise StepFailed(str(exc)) from None
        present = set((await session.check(["ls", host.wheels], timeout_s=60)).split())
        sent = 0
        for path in files:
            if path.name not in present or path == own:
                await session.put(path, f"{host.wheels}/{path.name}")
                sent += 1
        names = [f"{host.wheels}/{p.name}" for p in files]
        return f"{len(needed)} to install, {sent} copied, {len(files) - sent} already there", names

    names = await _step(report, host, Step.WHEELS, upload())

    async def install() -> tuple[str, str]:
        pip = [
            f"{host.venv}/bin/python",
            "-m",
            "pip",
            "install",
            "--no-index",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
        ]
        if len(names) > 1:
            await session.check([*pip, *names[:-1]], timeout_s=1800)
        await session.check([*pip, "--force-reinstall", names[-1]], timeout_s=600)
        answer = await session.check([f"{host.venv}/bin/python", "-c", VERSIONS], timeout_s=120)
        version, ray_version = json.loads(answer.strip().splitlines()[-1])
        if version != __version__ or ray_version != wanted["ray"]:
            raise StepFailed(
                f"the host runs gpuprovider {version} and Ray {ray_version} after install, "
                f"not {__version__} and {wanted['ray']}"
            )
        return f"gpuprovider {version}, Ray {ray_version}", version

    return await _step(report, host, Step.INSTALL, install())


async def _venv(session: Session, host: Host) -> tuple[str, None]:
    await session.check(["mkdir", "-p", host.prefix, host.wheels])
    exists = await session.run(["test", "-x", f"{host.venv}/bin/python"])
    if exists.exit_status == 0:
        return f"{host.venv} (kept)", None
    argv = [host.python, "-m", "venv", host.venv]
    if host.system_site_packages:
        argv.insert(3, "--system-site-packages")
    await session.check(argv, timeout_s=300)
    return f"{host.venv} (made)", None


async def _hardware(session: Session, host: Host) -> tuple[str, None]:
    answer = await session.check([f"{host.venv}/bin/python", "-c", HARDWARE], timeout_s=120)
    found = json.loads(answer.strip().splitlines()[-1])
    if found["gpus"]:
        text = f"{found['gpus']} NVIDIA GPU(s), driver {found['driver']}, CUDA {found['cuda']}"
    else:
        text = f"no NVIDIA GPU ({found['why'] or 'none found'})"
    if host.simulate_gpus:
        text += f"; simulated: {', '.join(host.simulate_gpus)}"
    return text, None


async def _unit(
    session: Session, host: Host, plan: Plan, systemd: bool, can_verify: bool
) -> tuple[str, bool]:
    """Write node.toml and the unit, verify it, enable it, (re)start it where systemd
    runs. Returns whether it was started."""
    await session.check(["mkdir", "-p", host.unit_dir])
    await session.write(units.node_config(host, plan.head).toml(), host.config)
    await session.write(units.node_unit(host), host.unit)
    said = []
    if can_verify:
        done = await session.run(["systemd-analyze", "verify", host.unit], timeout_s=60)
        complaints = "\n".join(
            line for line in done.output.splitlines() if "not been booted with systemd" not in line
        ).strip()
        if done.exit_status != 0 or complaints:
            raise StepFailed("systemd-analyze verify found faults in the unit", complaints)
        said.append("verified")
    else:
        said.append("not verified (no systemd-analyze on the host)")
    if systemd and host.unit_dir == "/etc/systemd/system":
        await session.check(["systemctl", "daemon-reload"])
        await session.check(["systemctl", "enable", NODE_UNIT])
        await session.check(["systemctl", "restart", NODE_UNIT])
        return f"{host.unit} {', '.join(said)}, enabled, started", True
    # what `systemctl enable` does for WantedBy=multi-user.target, without a systemd
    wants = f"{host.unit_dir}/multi-user.target.wants"
    await session.check(["mkdir", "-p", wants])
    await session.check(["ln", "-sfn", f"../{NODE_UNIT}", f"{wants}/{NODE_UNIT}"])
    why = "systemd does not run on the host" if not systemd else f"{host.unit_dir} is not systemd's"
    return f"{host.unit} {', '.join(said)}, enabled, NOT started: {why}", False


async def _ready(host: Host, plan: Plan, started: bool) -> tuple[str, None]:
    if plan.api is None:
        return "not waited for (--no-wait)", None
    if not started:
        return "not waited for: the unit was not started", None
    deadline = time.monotonic() + plan.ready_timeout_s
    status = None
    while time.monotonic() < deadline:
        status = await asyncio.to_thread(plan.api.node_status, host.name)
        if status in ("ready", "cordoned", "draining"):
            return f"node {host.name} is {status}", None
        await asyncio.sleep(1.0)
    raise StepFailed(
        f"node {host.name} is {status or 'not in `node list`'} after "
        f"{plan.ready_timeout_s:g}s; see `gpuprovider fleet exec {host.name} -- "
        f"journalctl -u {NODE_UNIT} -n 50`"
    )


async def _step(report: Reporter, host: Host, step: Step, work: Any) -> Any:
    """Run one step: reported with its result; StepFailed carrying the step otherwise."""
    try:
        detail, value = await work
    except StepFailed as exc:
        report(host.name, step, "fail", str(exc))
        exc.step = step  # type: ignore[attr-defined]
        raise
    except RemoteError as exc:
        report(host.name, step, "fail", str(exc))
        failed = StepFailed(str(exc), exc.output)
        failed.step = step  # type: ignore[attr-defined]
        raise failed from None
    report(host.name, step, "ok", detail)
    return value


async def _connect(host: Host, plan: Plan) -> tuple[str, Session]:
    session = await Session.open(host, plan.known, plan.accept_new)
    via = f" via {host.jump.host}" if isinstance(host.jump, Jump) else ""
    pinned = f"; host key pinned: {', '.join(session.pinned)}" if session.pinned else ""
    return f"{host.target}{via}{pinned}", session


async def _guarded(host: Host, report: Reporter, body: Any) -> Outcome:
    outcome = Outcome(host.name)
    start = time.monotonic()
    try:
        await body(outcome)
        outcome.ok = True
    except StepFailed as exc:
        outcome.failed_step = str(getattr(exc, "step", "?"))
        outcome.reason = str(exc)
        outcome.output = exc.output
    except Exception as exc:  # a bug or the unforeseen: this host fails, the others go on
        outcome.failed_step = "?"
        outcome.reason = f"{type(exc).__name__}: {exc}"
        report(host.name, "?", "fail", outcome.reason)
    outcome.seconds = time.monotonic() - start
    return outcome


async def add_host(host: Host, plan: Plan, report: Reporter, upgrade: bool = False) -> Outcome:
    async def body(outcome: Outcome) -> None:
        session = await _step(report, host, Step.CONNECT, _connect(host, plan))
        try:
            systemd, can_verify = await _step(report, host, Step.CHECK, _check(session, host, plan))
            if plan.check_only:
                return
            if upgrade and plan.api is not None:
                await _step(report, host, Step.DRAIN, _drain(host, plan))
            outcome.version = await _install(session, host, plan, report)
            await _step(report, host, Step.INVENTORY, _hardware(session, host))
            started = await _step(
                report, host, Step.UNIT, _unit(session, host, plan, systemd, can_verify)
            )
            outcome.started = started
            await _step(report, host, Step.READY, _ready(host, plan, started))
            if upgrade and plan.api is not None:
                await _step(report, host, Step.RESUME, _resume(host, plan))
        finally:
            session.close()

    return await _guarded(host, report, body)


async def _drain(host: Host, plan: Plan) -> tuple[str, None]:
    assert plan.api is not None
    if await asyncio.to_thread(plan.api.node_status, host.name) is None:
        return f"node {host.name} is not in the pool: nothing to drain", None
    await asyncio.to_thread(plan.api.drain, host.name)
    deadline = time.monotonic() + plan.drain_timeout_s
    while (left := await asyncio.to_thread(plan.api.running_on, host.name)) > 0:
        if time.monotonic() > deadline:
            raise StepFailed(
                f"{left} task(s) still run on {host.name} after {plan.drain_timeout_s:g}s; "
                "raise --drain-timeout or cancel them"
            )
        await asyncio.sleep(1.0)
    return f"node {host.name} drained: nothing runs there", None


async def _resume(host: Host, plan: Plan) -> tuple[str, None]:
    assert plan.api is not None
    await asyncio.to_thread(plan.api.resume, host.name)
    return f"node {host.name} takes work again", None


async def remove_host(host: Host, plan: Plan, report: Reporter, purge: bool) -> Outcome:
    async def body(outcome: Outcome) -> None:
        if plan.api is not None:
            await _step(report, host, Step.DRAIN, _drain(host, plan))
        session = await _step(report, host, Step.CONNECT, _connect(host, plan))
        try:
            await _step(report, host, Step.STOP, _stop(session, host, purge))
        finally:
            session.close()
        if plan.api is not None:
            await _step(report, host, Step.FORGET, _forget(host, plan))

    return await _guarded(host, report, body)


async def _stop(session: Session, host: Host, purge: bool) -> tuple[str, None]:
    probe = await session.run(["test", "-d", "/run/systemd/system"])
    said = []
    if probe.exit_status == 0 and host.unit_dir == "/etc/systemd/system":
        await session.run(["systemctl", "disable", "--now", NODE_UNIT], timeout_s=120)
        said.append("stopped and disabled")
    else:
        said.append("disabled (no systemd runs it here)")
    wants = f"{host.unit_dir}/multi-user.target.wants/{NODE_UNIT}"
    await session.check(["rm", "-f", wants, host.unit, host.config])
    if probe.exit_status == 0 and host.unit_dir == "/etc/systemd/system":
        await session.check(["systemctl", "daemon-reload"])
    said.append(f"{host.unit} and {host.config} removed")
    if purge:
        await session.check(["rm", "-rf", "--one-file-system", host.venv, host.wheels])
        said.append(f"{host.venv} and {host.wheels} removed")
    return ", ".join(said), None


async def _forget(host: Host, plan: Plan) -> tuple[str, None]:
    assert plan.api is not None
    if await asyncio.to_thread(plan.api.node_status, host.name) is None:
        return f"node {host.name} was not in the pool", None
    await asyncio.to_thread(plan.api.remove, host.name)
    return f"node {host.name} removed from the pool", None


async def run_all(hosts: list[Host], parallel: int, work: Callable[[Host], Any]) -> list[Outcome]:
    """Every host's work, at most `parallel` at once; one failing stops none of the others."""
    bound = asyncio.Semaphore(max(1, parallel))

    async def one(host: Host) -> Outcome:
        async with bound:
            return await work(host)

    return list(await asyncio.gather(*(one(h) for h in hosts)))


async def rolling(
    hosts: list[Host], max_unavailable: int, work: Callable[[Host], Any]
) -> list[Outcome]:
    """Hosts in batches of `max_unavailable`; the first batch with a failure is the last."""
    outcomes: list[Outcome] = []
    size = max(1, max_unavailable)
    for start in range(0, len(hosts), size):
        batch = await run_all(hosts[start : start + size], size, work)
        outcomes += batch
        if not all(o.ok for o in batch):
            outcomes += [
                Outcome(h.name, reason="not upgraded: an earlier host failed")
                for h in hosts[start + size :]
            ]
            break
    return outcomes


async def exec_on(host: Host, plan: Plan, argv: list[str]) -> tuple[int, str, str]:
    """A diagnostic command on a host: its exit status and output."""
    session = await Session.open(host, plan.known, plan.accept_new)
    try:
        done = await session.run(argv, timeout_s=600)
    finally:
        session.close()
    return done.exit_status, done.stdout, done.stderr


# The fleet's own record of its hosts: <home>/fleet/hosts.json.
def host_record(host: Host) -> dict[str, Any]:
    record = asdict(host)
    record["jump"] = host.jump.model_dump() if host.jump else None
    return record


def host_from_record(record: dict[str, Any]) -> Host:
    fields = {k: record[k] for k in Host.__dataclass_fields__}
    if isinstance(fields["jump"], dict):
        fields["jump"] = Jump(**fields["jump"])
    return Host(**fields)


def load_records(path: Path) -> dict[str, dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def save_records(path: Path, records: dict[str, dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
    partial.replace(path)


def record_outcome(
    records: dict[str, dict[str, Any]], host: Host, outcome: Outcome, action: str
) -> None:
    """What `fleet list` shows of a host after `action` (add, upgrade, remove)."""
    if action == "remove" and outcome.ok:
        records.pop(host.name, None)
        return
    entry = records.get(host.name, {})
    if outcome.ok and action != "check":
        entry["host"] = host_record(host)
        entry["version"] = outcome.version or entry.get("version", "")
        entry["state"] = "running" if outcome.started else "installed, not started"
    elif not outcome.ok:
        if "host" not in entry:
            entry["host"] = host_record(host)
        entry["state"] = f"{action} failed at {outcome.failed_step}"
    else:
        entry.setdefault("host", host_record(host))
        entry.setdefault("state", "checked")
    if outcome.failed_step != Step.CONNECT:
        entry["last_contact"] = time.time()
    records[host.name] = entry
