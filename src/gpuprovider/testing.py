"""Run a real provider for tests and benchmarks: a home in a temporary folder and
`gpuprovider up` as a subprocess on a free 127.0.0.1 port."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gpuprovider.bootstrap import init_home
from gpuprovider.domain.nodes import NodeStatus
from gpuprovider.domain.pricing import PriceTable
from gpuprovider.domain.process import Exit
from gpuprovider.domain.records import GpuRecord, NodeRecord, TaskRecord
from gpuprovider.domain.spec import TaskSpec
from gpuprovider.domain.states import TaskState
from gpuprovider.domain.usability import Usability
from gpuprovider.home import Home
from gpuprovider.isolation.policy import Applied, undo
from gpuprovider.lifecycle import nodes as lifecycle_nodes
from gpuprovider.lifecycle import tasks as lifecycle_tasks
from gpuprovider.market.client import Event
from gpuprovider.market.model import Decision
from gpuprovider.market.pricing import Pricing
from gpuprovider.market.usage import Usage
from gpuprovider.scheduler import policy
from gpuprovider.service.market import MarketService, MarketSettings
from gpuprovider.service.serving import GatewaySettings, Serving
from gpuprovider.service.tasks import TaskService
from gpuprovider.service.tokens import TokenService
from gpuprovider.store import migrate
from gpuprovider.store.signals import Signal, Signals
from gpuprovider.store.store import Store
from gpuprovider.telemetry.standin import ENV as STANDIN_ENV

GPUPROVIDER = str(Path(sys.executable).parent / "gpuprovider")
TERMINAL = {"succeeded", "failed", "cancelled", "expired"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SLACK = float(os.environ.get("GPUPROVIDER_TEST_SLACK", "1"))


def wait_for(condition: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` (times
    GPUPROVIDER_TEST_SLACK, for a machine busy with other work)."""
    timeout *= SLACK
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


NODE = "n-test"


def node_record(node_id: str = NODE, name: str = "box", gpus: int = 2) -> NodeRecord:
    """A ready node with `gpus` simulated H100s, as a backend would report it."""
    return NodeRecord(
        id=node_id, name=name, address="127.0.0.1", backend="local", labels={},
        status=NodeStatus.READY, status_reason="", cpu_count=8, memory_mib=65536, disk_mib=1000,
        public_key="", facts={}, last_heartbeat=time.time(),
        gpus=[GpuRecord(f"GPU-{node_id}-{i}", node_id, i, "h100-80gb-sxm", "sim", 81920, 80, True)
              for i in range(gpus)],
    )  # fmt: skip


class StoreWorld:
    """A store with one node, and the signals its transactions published: lifecycle
    rules tried alone, with no daemon (tasks are placed, run and ended by hand)."""

    def __init__(self, tmp_path: Path):
        self.signals = Signals()
        self.fired: list[tuple[Signal, set[str]]] = []
        for fired in set(Signal) - {Signal.JOURNAL}:  # every write journals: not news here

            def record(ids: set[str], s: Signal = fired) -> None:
                self.fired.append((s, ids))

            self.signals.subscribe(fired, record)
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.store = Store(f"sqlite:///{tmp_path / 'store.db'}", self.signals)
        migrate.upgrade(self.store)
        with self.store.tx() as tx:
            lifecycle_nodes.node_seen(tx, node_record())
        self.fired.clear()

    def submit(self, **fields: Any) -> TaskRecord:
        spec = TaskSpec.model_validate({"command": ["true"], **fields})
        with self.store.tx() as tx:
            task = tx.tasks.insert(spec, "team")
            lifecycle_tasks.submit(tx, task)
        return task

    def get(self, task_id: str) -> TaskRecord | None:
        with self.store.read() as r:
            return r.tasks.get(task_id)

    def place(self, task: TaskRecord, gpu: int = 0) -> None:
        with self.store.tx() as tx:
            tx.tasks.allocate(task, NODE, [f"GPU-{NODE}-{gpu}"], 1000, 0, 0)
            lifecycle_tasks.transition(tx, task, TaskState.SCHEDULED, "placed", node_id=NODE)

    def run(self, task: TaskRecord, pid: int = 4242) -> None:
        self.place(task)
        with self.store.tx() as tx:
            lifecycle_tasks.transition(tx, task, TaskState.STARTING, "starting", run_dir="/tmp/x")
            lifecycle_tasks.transition(
                tx, task, TaskState.RUNNING, "running", pid=pid, pid_start_time=1.0
            )

    def end(self, task: TaskRecord, ended: Exit) -> None:
        with self.store.tx() as tx:
            lifecycle_tasks.process_ended(tx, task, ended)

    def apply(self, action: Callable[..., Any], *args: Any) -> Any:
        with self.store.tx() as tx:
            return action(tx, *args)

    def allocations(self) -> list[Any]:
        with self.store.read() as r:
            return r.tasks.active_allocations()

    def node(self, ref: str = NODE) -> Any:
        with self.store.read() as r:
            return r.nodes.get(ref, removed=True)

    def events(self, task: TaskRecord) -> list[tuple[str | None, str]]:
        with self.store.read() as r:
            return [(e.from_state, e.to_state) for e in r.tasks.events(task.id)]


MARKET_JOB = {
    "resources": {"gpus": 1, "gpu_model": "h100", "cpus": 1, "memory_gb": 1},
    "max_price_per_hour": 3_000_000,
    "duration_s": 600,
    "payload": {"command": ["true"]},
}


class FakeMarket:
    """A market that records what it is told, and fails as a test asks, per lease."""

    pushes = False

    def __init__(self) -> None:
        self.bids: list[tuple[str, Decision]] = []
        self.states: list[tuple[str, str, dict[str, Any]]] = []
        self.usage: dict[str, list[Usage]] = {}
        self.fail: dict[str, Exception] = {}  # lease id -> what its reports raise

    def register(self, name: str, api_url: str, verify_token: str) -> dict[str, Any]:
        return {"status": "admitted", "status_reason": ""}

    def beat(self) -> dict[str, Any]:
        return {}  # the market's view of this provider: nothing to say

    def events(self, after: int) -> Iterator[Event]:
        return iter(())

    def respond(self, order_id: str, mode: str, decision: Decision) -> None:
        self.bids.append((order_id, decision))

    def report_state(self, lease_id: str, state: str, **details: Any) -> dict[str, Any]:
        if lease_id in self.fail:
            raise self.fail[lease_id]
        self.states.append((lease_id, state, details))
        return {"running_at": time.time()} if state == "running" else {}

    def report_usage(self, usage: Usage) -> None:
        if usage.lease_id in self.fail:
            raise self.fail[usage.lease_id]
        self.usage.setdefault(usage.lease_id, []).append(usage)

    def paid(self) -> int | None:
        return None

    def close(self) -> None:
        pass


class MarketWorld(StoreWorld):
    """A store with one node of two H100s, and the provider's side of one market (its
    `FakeMarket` for a connector): lease rules tried with no daemon and no hub."""

    def __init__(self, tmp_path: Path, key: Ed25519PrivateKey):
        super().__init__(tmp_path)
        serving = Serving(self.store, GatewaySettings())
        self.tasks = TaskService(
            self.store,
            policy("best-fit"),
            Usability(),
            None,  # type: ignore[arg-type]  # no backend: these tests run no task
            lambda: None,
            serving,  # type: ignore[arg-type]
        )
        self.connector = FakeMarket()
        self.service = MarketService(
            self.store,
            self.tasks,
            TokenService(self.store),
            key,
            Pricing(PriceTable(gpu_hour={"h100": 1.0}, cpu_hour=0.1)),
            MarketSettings("hub", "http://hub", "", "p", usage_interval_s=0.0),
            self.connector,
        )

    def won(self, lease_id: str = "ord-1", order: dict[str, Any] | None = None) -> None:
        """The order (a 1-GPU job by default) bid on, and won at the price bid."""
        order = order or MARKET_JOB
        self.service.on_order({"order": order | {"id": lease_id}, "mode": "auction"})
        price = self.lease(lease_id).price_per_hour
        self.service.on_won(lease_id, price, order | {"id": lease_id})

    def lease(self, lease_id: str = "ord-1") -> Any:
        with self.store.read() as r:
            return r.market.get(lease_id)

    def task_of(self, lease_id: str = "ord-1") -> Any:
        lease = self.lease(lease_id)
        return self.get(lease.task_id) if lease and lease.task_id else None

    def history(self, lease_id: str = "ord-1") -> list[tuple[str | None, str]]:
        with self.store.read() as r:
            return [(row.from_state, row.to_state) for row in r.market.history(lease_id)]


SIMULATED = """
[[inventory.simulated_gpus]]
model = "h100-80gb-sxm"
count = 2

[[inventory.simulated_gpus]]
model = "rtx-4090-24gb"
count = 1
"""


def make_home(
    root: Path,
    port: int,
    gpus: str = SIMULATED,
    poll_interval_s: float = 0.05,
    grace_s: float = 1.0,
    port_range: tuple[int, int] = (31000, 31999),
    reaper_interval_s: float = 0.2,
    container_engine: str = "none",
    task_users: str = "none",
    gateway_port: int | None = None,
) -> Home:
    """An initialised home listening on `port`, with loops fast enough for tests."""
    # (tasks still run in cgroups of their own: tests/test_isolation.py runs them as
    # pool users too)
    home = Home(root)
    init_home(home, simulate=False)
    text = home.config.read_text()
    for pattern, value in (
        (r"(?m)^port = 8085$", f"port = {port}"),
        (r"(?m)^poll_interval_s = .*$", f"poll_interval_s = {poll_interval_s}"),
        (r"(?m)^stop_grace_s = .*$", f"stop_grace_s = {grace_s}"),
        (
            r"(?ms)^(\[executor\].*?)^port_range = .*?$",
            rf"\1port_range = [{port_range[0]}, {port_range[1]}]",
        ),
        (r"(?ms)^(\[reaper\].*?)^interval_s = .*?$", rf"\1interval_s = {reaper_interval_s}"),
        # whatever GPUs and engines the machine has, tests see what they ask for only
        (r"(?m)^nvml = true$", "nvml = false"),
        (r'(?m)^container_engine = "auto"$', f'container_engine = "{container_engine}"'),
        # tasks share files with the tests, and may run the test's own Python (which can
        # live in root's home): as the provider's user unless a test asks for the pool
        (r'(?m)^users = "auto"$', f'users = "{task_users}"'),
        # a gateway only where a test asks for one, on its own port
        (r"(?m)^enabled = true$", f"enabled = {str(gateway_port is not None).lower()}"),
        (r"(?m)^port = 8086$", f"port = {gateway_port or free_port()}"),
    ):
        text = _set_once(text, pattern, value)
    home.config.write_text(text + gpus)
    return home


def _set_once(text: str, pattern: str, value: str) -> str:
    """`text` with the one match of `pattern` replaced: the default config has it."""
    text, count = re.subn(pattern, value, text)
    assert count == 1, f"the default config changed: {pattern} not found"
    return text


def watch_home(
    home: Home,
    kernel_log: Path | str,
    interval_s: float = 1.0,
    webhooks: tuple[str, ...] = (),
    reset_command: tuple[str, ...] = ("true",),
    dry_run: bool = False,
) -> None:
    """Have `home` read GPUs from NVML (a test's stand-in), XIDs from `kernel_log`, and
    send alerts to `webhooks`."""
    text = home.config.read_text()
    for pattern, value in (
        (r"(?m)^nvml = false$", "nvml = true"),
        (r'(?m)^kernel_log = "auto"$', f"kernel_log = {json.dumps(str(kernel_log))}"),
        (r"(?ms)^(\[telemetry\].*?)^interval_s = .*?$", rf"\1interval_s = {interval_s}"),
        (r"(?m)^webhooks = \[\]$", f"webhooks = {json.dumps(list(webhooks))}"),
        (r"(?m)^reset_command = .*$", f"reset_command = {json.dumps(list(reset_command))}"),
        (r"(?m)^dry_run = false$", f"dry_run = {str(dry_run).lower()}"),
    ):
        text = _set_once(text, pattern, value)
    home.config.write_text(text)


def ray_home(
    home: Home,
    address: str,
    lease_s: float | None = None,
    grace_s: float | None = None,
    node_dir: Path | None = None,
    inventory_interval_s: float | None = None,
) -> None:
    """Have `home` run its work on the Ray cluster at `address` (again: another
    address), with these `[backend]` and `[inventory]` settings where given."""
    text = home.config.read_text()
    section = {"kind": json.dumps("ray"), "address": json.dumps(address)}
    if lease_s is not None:
        section["lease_s"] = str(lease_s)
    if grace_s is not None:
        section["lease_grace_s"] = str(grace_s)
    if node_dir is not None:
        section["node_dir"] = json.dumps(str(node_dir))
    start = text.index("[backend]\n")
    end = text.index("\n[", start + 1)
    kept = [  # the section's other keys as they were (commented or set before)
        line
        for line in text[start:end].splitlines()[1:]
        if not any(re.match(rf"^#? ?{key} = ", line) for key in section)
    ]
    lines = ["[backend]", *(f"{key} = {value}" for key, value in section.items()), *kept]
    text = text[:start] + "\n".join(lines) + "\n" + text[end:]
    if inventory_interval_s is not None:
        pattern = r"(?ms)^(\[inventory\].*?)^interval_s = .*?$"
        text = _set_once(text, pattern, rf"\1interval_s = {inventory_interval_s}")
    home.config.write_text(text)


def market_home(
    home: Home,
    hub_url: str,
    hub_key: str,
    gpu_hour: dict[str, float],
    usage_interval_s: float = 1.0,
    api_url: str = "",
    simulated_memory_mib: int = 16,
) -> None:
    """Have `home` take work from the hub at `hub_url` (trusting its verifier key), price
    GPUs by `gpu_hour`, beat each second and prove simulated GPUs over a few MiB."""
    text = _priced(home.config.read_text(), gpu_hour)
    text = _set_once(
        text, r"(?m)^simulated_memory_mib = .*$", f"simulated_memory_mib = {simulated_memory_mib}"
    )
    home.config.write_text(
        text
        + f"""
[market.hub]
url = "{hub_url}"
verifier_key = "{hub_key}"
heartbeat_s = 1.0
usage_interval_s = {usage_interval_s}
api_url = "{api_url}"
"""
    )


def _priced(text: str, gpu_hour: dict[str, float]) -> str:
    prices = ", ".join(f'"{model}" = {price}' for model, price in gpu_hour.items())
    return _set_once(text, r"(?m)^gpu_hour = \{\}.*$", f"gpu_hour = {{ {prices} }}")


def swan_home(
    home: Home,
    orchestrator: str,
    cp_account: str,
    node_id: str,
    source_host: str,
    gpu_hour: dict[str, float],
) -> None:
    """Have `home` take jobs from Swan's orchestrator `orchestrator` (an address), fetch
    spaces from `source_host` only, price GPUs by `gpu_hour` (one token = one unit)."""
    home.config.write_text(
        _priced(home.config.read_text(), gpu_hour)
        + f"""
[market.swan]
kind = "swan"
orchestrator = "{orchestrator}"
cp_account = "{cp_account}"
node_id = "{node_id}"
token_price = 1.0
source_hosts = ["{source_host}"]
usage_interval_s = 1.0
"""
    )


class HubProcess:
    """A `gpuprovider hub serve` subprocess on 127.0.0.1, with its admin token."""

    def __init__(self, folder: Path, port: int, *extra: str):
        self.folder, self.port, self.extra = folder, port, extra
        self.url = f"http://127.0.0.1:{port}"
        folder.mkdir(parents=True, exist_ok=True)
        self.start()
        self.key = httpx.get(self.url + "/v1/info").json()["verifier_key"]
        self.admin = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {(folder / 'admin.token').read_text().strip()}"},
            timeout=30,
        )

    def start(self) -> None:
        log = open(self.folder / "hub.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [
                GPUPROVIDER,
                "hub",
                "serve",
                "--dir",
                str(self.folder),
                "--port",
                str(self.port),
                *self.extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(self._answers, timeout=20, what="the hub to answer")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the hub exited: {(self.folder / 'hub.log').read_text()}")
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(self.url + "/v1/info", timeout=1).status_code == 200
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class StandinGpus:
    """A stand-in NVML's script (`telemetry/standin.py`): H100s a test can make fail.
    Hand `env` to the daemon; change a GPU with `set` (written at once, atomically)."""

    def __init__(self, path: Path, count: int = 2, name: str = "NVIDIA H100 80GB HBM3"):
        self.path = path
        self.gpus: list[dict[str, Any]] = [
            {
                "uuid": f"GPU-standin-{i:04d}",
                "name": name,
                "pci": f"00000000:{0x10 + i:02X}:00.0",
                "memory_total": 80 * 2**30,
                "memory_used": 0,
                "utilization": 0,
                "temperature": 35,
                "power_mw": 70_000,
                "ecc": {
                    "uncorrected_volatile": 0,
                    "uncorrected_aggregate": 0,
                    "corrected_volatile": 0,
                    "corrected_aggregate": 0,
                },
                "retired": {"single_bit": 0, "double_bit": 0, "pending": False},
                "remap": {"correctable": 0, "uncorrectable": 0, "pending": False, "failure": False},
                "clock_reasons": 0,
                "pcie_replays": 0,
                "nvlink": {"crc_flit": 0, "crc_data": 0, "replay": 0, "recovery": 0},
            }
            for i in range(count)
        ]
        self.write()

    @property
    def env(self) -> dict[str, str]:
        return {STANDIN_ENV: str(self.path)}

    def kernel_line(self, index: int, xid: int, text: str = "") -> str:
        """A kernel log line as the driver writes it, for XID `xid` on GPU `index`."""
        bus = int(self.gpus[index]["pci"].split(":")[1], 16)
        return f"NVRM: Xid (PCI:0000:{bus:02x}:00): {xid}, pid=1234, name=python3, {text}\n"

    def set(self, index: int, **changes: Any) -> None:
        for key, value in changes.items():
            if isinstance(value, dict):
                self.gpus[index].setdefault(key, {}).update(value)
            else:
                self.gpus[index][key] = value
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"driver": "570.86.15", "gpus": self.gpus}))
        tmp.replace(self.path)


class Provider:
    """A `gpuprovider up` subprocess and clients for it."""

    def __init__(self, home: Home, port: int):
        self.home, self.port = home, port
        self.url = f"http://127.0.0.1:{port}"
        self.token = home.token.read_text().strip()
        self.proc: subprocess.Popen | None = None
        self.up_args: list[str] = []  # options for `gpuprovider up`
        self.env: dict[str, str] = {}  # more environment for the daemon
        # a machine shared with other work starts a daemon slower: GPUPROVIDER_TEST_SLACK
        # multiplies this bound (and every wait of the tests that use `slack`)
        self.start_timeout_s = 15.0 * SLACK
        self.api = httpx.Client(
            base_url=self.url + "/api/v1",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
        )

    def start(self) -> None:
        log = open(self.home.root / "daemon.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [GPUPROVIDER, "--home", str(self.home.root), "up", *self.up_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **self.env},
        )
        log.close()

        def healthy() -> bool:
            assert self.proc is not None  # started above
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.log()}")
            try:
                return httpx.get(self.url + "/api/v1/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        try:
            wait_for(healthy, self.start_timeout_s, "the daemon to answer")
        except AssertionError:  # never leave a daemon (or its trial Ray cluster) behind
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.stop(signal.SIGTERM)
            self.stop(signal.SIGKILL)
            raise

    def log(self) -> str:
        return (self.home.root / "daemon.log").read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)
        return self.proc.returncode if self.proc else None

    def cli(
        self, *args: str, stdin: str | None = None, timeout: float = 60, columns: int = 200
    ) -> subprocess.CompletedProcess:
        env = {**os.environ, "COLUMNS": str(columns), "GPUPROVIDER_HOME": str(self.home.root)}
        return subprocess.run(
            [GPUPROVIDER, *args],
            capture_output=True,
            text=True,
            env=env,
            input=stdin,
            timeout=timeout,
        )

    def tenant(self, name: str, scopes: tuple[str, ...] = ("read", "submit"), **extra: Any):
        """An API client with a new token of its own (its tenant: `name` unless
        `extra` says otherwise)."""
        made = self.api.post("/tokens", json={"name": name, "scopes": list(scopes), **extra})
        assert made.status_code == 201, made.text
        return httpx.Client(
            base_url=self.url + "/api/v1",
            headers={"Authorization": f"Bearer {made.json()['token']}"},
            timeout=30,
        )

    def submit(self, **spec: Any) -> dict:
        response = self.api.post("/tasks", json=spec)
        assert response.status_code == 201, response.text
        return response.json()

    def task(self, ref: str) -> dict:
        response = self.api.get(f"/tasks/{ref}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait_state(self, ref: str, states: set[str] | str, timeout: float = 20) -> dict:
        wanted = {states} if isinstance(states, str) else states
        return wait_for(
            lambda: (t := self.task(ref))["state"] in wanted and t,
            timeout,
            f"task {ref} to reach {wanted}",
        )

    def task_dir(self, task_id: str) -> Path:
        return self.home.tasks / task_id

    def logs(self, ref: str) -> str:
        """All a task's output the provider keeps, page by page."""
        pieces, offset = [], 0
        while (page := self.api.get(f"/tasks/{ref}/logs", params={"offset": offset})).content:
            pieces.append(page.content)
            offset = int(page.headers["X-Log-Next"])
        return b"".join(pieces).decode(errors="replace")

    def cancel_all(self) -> None:
        """Cancel every live task (nothing to do when the daemon does not answer)."""
        with contextlib.suppress(httpx.TransportError):
            for task in self.api.get("/tasks", params={"limit": 100000}).json():
                if task["state"] not in TERMINAL:
                    self.api.post(f"/tasks/{task['id']}/cancel")


@contextlib.contextmanager
def running(home: Home, port: int) -> Iterator[Provider]:
    """A provider started on `home`; afterwards its tasks cancelled, the daemon stopped,
    and nothing of its tasks left running."""
    provider = Provider(home, port)
    provider.start()
    try:
        yield provider
    finally:
        with contextlib.suppress(httpx.HTTPError):
            provider.cancel_all()
        provider.stop()
        kill_task_processes(home)


def kill_task_processes(home: Home) -> None:
    """Leave no task process behind a test, whatever happened to the daemon: the
    runner server of this home, every runner, each command a runner started in a
    process group of its own; and each attempt's cgroup and user."""
    kill_processes_mentioning(home.tasks)
    with contextlib.suppress(OSError, ValueError, ProcessLookupError):
        os.kill(int(home.gateway_pid.read_text()), signal.SIGKILL)
    for record in home.tasks.glob("*/isolation-*.json"):
        if applied := Applied.load(str(record)):
            undo(applied)


def kill_processes_mentioning(path: Path) -> None:
    """Kill every process whose command line names `path`, with its descendants and
    their process groups."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if not any(str(path) in part for part in cmdline):
            continue
        with contextlib.suppress(psutil.Error):
            for member in [proc, *proc.children(recursive=True)]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(member.pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(member.pid, signal.SIGKILL)


def ray_cluster(**head: Any) -> Any:
    """A Ray cluster on 127.0.0.1 with its head only (Ray's multi-node-on-one-machine
    tool): the head runs no tasks and notices a dead node within seconds; `head`
    overrides its arguments. Needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 set before Ray is
    imported."""
    from ray.cluster_utils import Cluster

    return Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4},
        }
        | head,
    )


# A job that writes a heartbeat line every 0.1 s into a file named after its attempt,
# in the folder given as its argument: two attempts ran at once if their beats overlap.
HEARTBEAT_JOB = (
    "import os, pathlib, sys, time\n"
    "path = pathlib.Path(sys.argv[1], os.environ['GPUPROVIDER_ATTEMPT'])\n"
    "while True:\n"
    "    with path.open('a') as f: f.write(f'{time.time()}\\n')\n"
    "    time.sleep(0.1)\n"
)


def heartbeats(marks: Path) -> dict[int, list[float]]:
    """Each attempt's heartbeat times, from a HEARTBEAT_JOB's folder."""
    return {
        int(f.name): [float(x) for x in f.read_text().split()]
        for f in marks.iterdir()
        if f.read_text().strip()
    }


def concurrent_attempts(marks: Path) -> list[tuple[int, int]]:
    """The pairs of attempts whose heartbeats overlap: (earlier, later)."""
    spans = sorted((min(b), max(b), attempt) for attempt, b in heartbeats(marks).items())
    return [(a, b) for (_, end, a), (start, _, b) in itertools.pairwise(spans) if end >= start]


# -- a real sshd for the fleet's tests and benchmark --------------------------------------

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleet-test", "-f", str(path)],
        check=True,
    )
    return path.with_suffix(".pub").read_text().strip()


class Sshd:
    """sshd -D on 127.0.0.1 at a free port, logging in only with the test's key."""

    def __init__(self, root: Path, client_public: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = free_port()
        self.host_public = keygen(root / "host_key")
        authorized = root / "authorized_keys"
        authorized.write_text(client_public + "\n")
        authorized.chmod(0o600)
        config = root / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\n"
            f"AuthorizedKeysFile {authorized}\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            f"UsePAM no\nStrictModes no\nPidFile {root / 'sshd.pid'}\n"
            "Subsystem sftp internal-sftp\nLogLevel ERROR\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
        with open(root / "sshd.log", "w") as log:
            self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=log)
        wait_for(lambda: _answers(self.port), 20, "sshd")

    def known_line(self) -> str:
        kind, key = self.host_public.split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {key}\n"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False
