"""The agent: one detached Ray actor per gpuprovider node of the cluster, pinned there,
running the local backend's processes on that node and reporting its hardware.

A node is who its key says: the agent keeps an Ed25519 key under the data folder, per
node name, so a Ray restart, an agent restart or a reboot brings back the same node id
(never a ghost beside the old one). Every call carries the provider's credential (only
its hash reaches the agent): a tenant's task that finds the actor cannot use it. Each
start and poll renews the node's lease (`runner.Fence`): the attempts the provider
counts as running here, until a deadline the provider set when it sent the call.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import socket
import threading
import time
from pathlib import Path

from gpuprovider import __version__
from gpuprovider.backends.base import Exit, Handle, Launch
from gpuprovider.backends.local import LocalProcesses
from gpuprovider.backends.ray.common import SIM_PREFIX
from gpuprovider.backends.runner import read_output
from gpuprovider.backends.workfiles import NotInWorkdir
from gpuprovider.config import SimulatedGpu
from gpuprovider.domain.records import NodeRecord
from gpuprovider.identity.keys import create_node_key, load_node_key, node_id_for
from gpuprovider.inventory.local import read_local_node
from gpuprovider.isolation.policy import Settings
from gpuprovider.telemetry.node import NodeTelemetry, NodeWatcher


def _code_version() -> str:
    """gpuprovider's version and a digest of the code an agent runs (this folder and the
    local backend's): an agent made by other code is replaced, even at the same version."""
    digest = hashlib.sha256()
    here = Path(__file__).parent
    for path in [*sorted(here.glob("*.py")), *sorted(here.parent.glob("*.py"))]:
        digest.update(path.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:12]}"


AGENT_VERSION = _code_version()


class Refused(PermissionError):
    """A call without the provider's credential."""


def credential_hash(credential: str) -> str:
    return hashlib.sha256(credential.encode()).hexdigest()


def node_folder(data_dir: str, name: str) -> Path:
    """Where a node keeps its key and its lease: per name, so that the nodes of a trial
    cluster on one machine stay apart."""
    return Path(data_dir) / "nodes" / re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:64]


def node_key(folder: Path):
    path = folder / "node.key"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return load_node_key(path)
    except FileNotFoundError:
        try:
            return create_node_key(path)
        except FileExistsError:  # another agent of this name made it first
            return load_node_key(path)


class NodeAgent:
    """Runs on one Ray node (as a detached actor): the local backend, there."""

    def __init__(
        self,
        credential_sha256: str,
        name: str,
        labels: dict[str, str],
        data_dir: str,
        isolation: dict | None = None,
        kernel_log: str = "",
    ):
        self.credential = credential_sha256
        # unnamed (a KubeRay worker group): the pod's host name
        self.name, self.data_dir = name or socket.gethostname(), data_dir
        folder = node_folder(data_dir, self.name)
        self.node_id = node_id_for(node_key(folder))
        self.declared = [
            SimulatedGpu(model=key.removeprefix(SIM_PREFIX), count=int(value))
            for key, value in labels.items()
            if key.startswith(SIM_PREFIX)
        ]
        self.labels = {
            k: v for k, v in labels.items() if not k.startswith(("gpuprovider.io/", "ray.io/"))
        }
        self.local = LocalProcesses(
            Path(data_dir),
            isolation=Settings(**(isolation or {})),
            lease_file=str(folder / "lease.json"),
        )
        self.watcher: NodeWatcher | None = None
        if kernel_log:  # XIDs from now on: the log is read from its end at the start
            self.watcher = NodeWatcher(self.node_id, kernel_log)
            self.watcher.read(poll_nvml=False)
        self.leased: tuple[float, frozenset[str]] = (0.0, frozenset())
        self.leasing = threading.Lock()  # calls run on several threads (max_concurrency)

    def _check(self, credential: str) -> None:
        if not hmac.compare_digest(credential_hash(credential), self.credential):
            raise Refused("this agent serves its provider only")

    def _lease(self, deadline: float, lease_s: float, attempts: list[str]) -> None:
        """Renew the node's lease to `deadline` (set by the provider when it sent the
        call: a call that arrives late renews nothing past it) for `attempts`; written
        when the attempts change or the deadline moved by a quarter of the period: a
        restart lease (`renew`) is cut back to the usual one at the first poll after it."""
        with self.leasing:
            expires, listed = self.leased
            wanted = frozenset(attempts)
            if wanted != listed or abs(deadline - expires) > lease_s / 4:
                self.local.lease(deadline, sorted(wanted))
                self.leased = (deadline, wanted)

    def renew(self, credential: str, deadline: float, lease_s: float, attempts: list[str]) -> None:
        """The lease alone: what a provider that stops cleanly grants its nodes, long
        enough for it to come back (`[backend] restart_grace_s`)."""
        self._check(credential)
        self._lease(deadline, lease_s, attempts)

    def inventory(self, credential: str, address: str) -> NodeRecord:
        self._check(credential)
        node = read_local_node(
            self.node_id, self.name, "", Path(self.data_dir), self.declared, self.labels
        )
        node.backend, node.address = "ray", address
        node.facts["host"] = socket.gethostname()
        node.facts["isolation"] = self.local.isolation.describe()
        node.facts["agent_version"] = AGENT_VERSION
        return node

    def telemetry(self, credential: str, poll_nvml: bool, kernel_log: str) -> NodeTelemetry:
        self._check(credential)
        if self.watcher is None:
            self.watcher = NodeWatcher(self.node_id, kernel_log)
        return self.watcher.read(poll_nvml)

    def start_many(
        self,
        credential: str,
        launches: list[Launch],
        deadline: float,
        lease_s: float,
        attempts: list[str],
    ) -> list[Handle | OSError]:
        import ray

        self._check(credential)
        if time.time() > deadline:  # sent too long ago: the provider gave these up
            return [OSError("the start arrived after its lease ran out") for _ in launches]
        self._lease(deadline, lease_s, attempts)
        node = ray.get_runtime_context().get_node_id()
        for launch in launches:
            launch.env["GPUPROVIDER_RAY_NODE"] = node
        return self.local.start_many(launches)

    def poll_many(
        self,
        credential: str,
        handles: list[Handle],
        deadline: float,
        lease_s: float,
        attempts: list[str],
    ) -> list[Exit | None]:
        self._check(credential)
        self._lease(deadline, lease_s, attempts)
        return self.local.poll_many(handles)

    def stop(self, credential: str, handle: Handle) -> bool:
        self._check(credential)
        return self.local.stop(handle)

    def kill(self, credential: str, handle: Handle) -> None:
        self._check(credential)
        self.local.kill(handle)

    def recover(self, credential: str, run_dir: str, attempt: int) -> Handle | None:
        self._check(credential)
        return self.local.recover(run_dir, attempt, self.node_id)

    def list_files(self, credential: str, run_dir: str, path: str) -> list[dict] | None:
        """None: not in the work folder (the driver raises NotInWorkdir again)."""
        self._check(credential)
        try:
            return self.local.list_files(self.node_id, run_dir, path)
        except NotInWorkdir:
            return None

    def read_file(
        self, credential: str, run_dir: str, path: str, offset: int, limit: int
    ) -> tuple[int, bytes] | None:
        self._check(credential)
        try:
            return self.local.read_file(self.node_id, run_dir, path, offset, limit)
        except NotInWorkdir:
            return None

    def remove_work(self, credential: str, run_dir: str) -> None:
        self._check(credential)
        self.local.remove_work(self.node_id, run_dir)

    def read_log(self, credential: str, run_dir: str, offset: int, limit: int) -> tuple[int, bytes]:
        self._check(credential)
        return read_output(run_dir, offset, limit)
