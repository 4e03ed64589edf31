"""The agent: one detached Ray actor per gpuprovider node of the cluster, pinned there,
running the local backend's processes on that node and reporting its hardware."""

from __future__ import annotations

import socket
from pathlib import Path

from gpuprovider.backends.base import Exit, Handle, Launch
from gpuprovider.backends.local import LocalProcesses
from gpuprovider.backends.ray.common import SIM_PREFIX
from gpuprovider.backends.runner import read_output
from gpuprovider.config import SimulatedGpu
from gpuprovider.domain.records import NodeRecord
from gpuprovider.inventory.local import read_local_node
from gpuprovider.isolation.policy import Settings
from gpuprovider.telemetry.node import NodeTelemetry, NodeWatcher


class NodeAgent:
    """Runs on one Ray node (as a detached actor): the local backend, there."""

    def __init__(
        self,
        node_id: str,
        name: str,
        labels: dict[str, str],
        data_dir: str,
        isolation: dict | None = None,
    ):
        # unnamed (a KubeRay worker group): the pod's host name
        self.node_id, self.name, self.data_dir = node_id, name or socket.gethostname(), data_dir
        self.declared = [
            SimulatedGpu(model=key.removeprefix(SIM_PREFIX), count=int(value))
            for key, value in labels.items()
            if key.startswith(SIM_PREFIX)
        ]
        self.labels = {
            k: v for k, v in labels.items() if not k.startswith(("gpuprovider.io/", "ray.io/"))
        }
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        self.local = LocalProcesses(Path(data_dir), isolation=Settings(**(isolation or {})))
        self.watcher: NodeWatcher | None = None

    def inventory(self, address: str) -> NodeRecord:
        node = read_local_node(
            self.node_id, self.name, "", Path(self.data_dir), self.declared, self.labels
        )
        node.backend, node.address = "ray", address
        node.facts["host"] = socket.gethostname()
        node.facts["isolation"] = self.local.isolation.describe()
        return node

    def telemetry(self, poll_nvml: bool, kernel_log: str) -> NodeTelemetry:
        if self.watcher is None:
            self.watcher = NodeWatcher(self.node_id, kernel_log)
        return self.watcher.read(poll_nvml)

    def start(self, launch: Launch) -> Handle:
        import ray

        launch.env["GPUPROVIDER_RAY_NODE"] = ray.get_runtime_context().get_node_id()
        return self.local.start(launch)

    def start_many(self, launches: list[Launch]) -> list[Handle | OSError]:
        import ray

        node = ray.get_runtime_context().get_node_id()
        for launch in launches:
            launch.env["GPUPROVIDER_RAY_NODE"] = node
        return self.local.start_many(launches)

    def poll(self, handle: Handle) -> Exit | None:
        return self.local.poll(handle)

    def poll_many(self, handles: list[Handle]) -> list[Exit | None]:
        return self.local.poll_many(handles)

    def stop(self, handle: Handle) -> bool:
        return self.local.stop(handle)

    def kill(self, handle: Handle) -> None:
        self.local.kill(handle)

    def recover(self, run_dir: str, attempt: int) -> Handle | None:
        return self.local.recover(run_dir, attempt, self.node_id)

    def read_log(self, run_dir: str, offset: int, limit: int) -> tuple[int, bytes]:
        return read_output(run_dir, offset, limit)
