"""What to run for one attempt, built once for every backend.

The daemon builds a `Launch` from the task, its allocation and its node: the command
or container, the environment the provider sets, the limits. What only the node that
runs it can know (free ports, its own base environment) is settled there, by
`settle` at start.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass, field

from gpuprovider.backends.container import ContainerLaunch, ContainerLimits, container_argv
from gpuprovider.domain.records import AllocationRecord, GpuRecord, OwnerKind, TaskRecord
from gpuprovider.domain.spec import VISIBILITY_ENV, set_by_provider


@dataclass
class RentalLaunch:
    """What a rental's environment needs of the node beyond a container: its disk (an
    image mounted at `mount_dir`, bound in read-write), its home (bound in read-only,
    holding the keys its SSH server accepts), its host key, and its ports, whose
    numbers are the rental's and never chosen here."""

    name: str  # the user the tenant logs in as
    disk_image: str
    mount_dir: str
    home_dir: str
    host_key: str
    ports: dict[str, int]
    disk_target: str = "/data"
    home_target: str = "/home"
    host_key_target: str = "/etc/gpuprovider/ssh_host_key"


@dataclass
class Launch:
    task_id: str
    attempt: int
    argv: list[str]  # the command (for an image: set by `settle`)
    env: dict[str, str]  # the spec's and the provider's, ports aside
    workdir: str
    run_dir: str
    max_duration_s: float | None = None
    grace_s: float = 10.0
    node_id: str = ""  # the node the scheduler chose
    port_names: list[str] = field(default_factory=list)
    taken_ports: list[int] = field(default_factory=list)  # held by other work on the node
    port_range: tuple[int, int] = (20000, 29999)
    container: ContainerLaunch | None = None
    # What the node isolates the attempt with (its cgroup's limits, its device list).
    memory_mib: int = 0
    cpu_milli: int = 0
    gpu_minors: list[int] = field(default_factory=list)
    own_workdir: bool = True  # the task's own folder (handed to its user), not the spec's
    # An archive (checked when it came) unpacked into the work folder at the task's first
    # start: its path on the provider's machine, and for a remote node its bytes.
    upload: str = ""
    upload_data: bytes | None = None
    # Volumes: (folder on the node, where the task sees it, size limit in bytes)
    mounts: list[tuple[str, str, int]] = field(default_factory=list)
    rental: RentalLaunch | None = None


def build_launch(
    task: TaskRecord,
    allocation: AllocationRecord,
    gpus: list[GpuRecord],
    run_dir: str,
    grace_s: float,
    port_range: tuple[int, int],
    taken_ports: list[int],
    engine: str | None,
    container_runtime: str = "",
    container_read_only: bool = True,
    upload: str = "",
    mounts: list[tuple[str, str, int]] | None = None,
) -> Launch:
    """The launch of `task`'s current attempt on the GPUs `gpus` of its allocation."""
    spec = task.task_spec
    indices = sorted(g.idx for g in gpus)
    visible = ",".join(map(str, indices))
    env = dict(spec.env)
    env["CUDA_VISIBLE_DEVICES"] = visible
    env["NVIDIA_VISIBLE_DEVICES"] = visible or "none"
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # indices as NVML numbers them
    env["GPUPROVIDER_TASK_ID"] = task.id
    env["GPUPROVIDER_ATTEMPT"] = str(task.attempt)
    if indices and allocation.gpu_milli < 1000:
        env["GPUPROVIDER_GPU_SHARE"] = f"{allocation.gpu_milli / 1000:g}"
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(max(1, allocation.gpu_milli // 10))
    launch = Launch(
        task_id=task.id,
        attempt=task.attempt,
        argv=list(spec.command or []),
        env=env,
        workdir=spec.workdir or os.path.join(run_dir, "work"),
        run_dir=run_dir,
        max_duration_s=spec.max_duration_s,
        grace_s=grace_s,
        node_id=allocation.node_id,
        port_names=[p.name for p in spec.ports],
        taken_ports=taken_ports,
        port_range=port_range,
        memory_mib=allocation.memory_mib,
        cpu_milli=allocation.cpu_milli,
        gpu_minors=[g.idx for g in gpus],
        # a pipeline's work store (its own folder, made by the provider) is handed to
        # each stage's user in turn, with what earlier stages left there
        own_workdir=spec.workdir is None
        or bool(spec.image)
        or task.owner_kind == OwnerKind.PIPELINE,
        upload=upload,
        mounts=mounts or [],
    )
    if spec.image:
        launch.container = ContainerLaunch(
            engine=engine or "docker",
            name=f"gpuprovider-{task.id}-{task.attempt}",
            image=spec.image,
            args=list(spec.command or []),
            env_keys=sorted(spec.env),
            gpu_uuids=[g.uuid for g in gpus if not g.simulated],
            workdir=spec.workdir,
            runtime=container_runtime,
            read_only=container_read_only,
        )
        launch.workdir = os.path.join(run_dir, "work")
    return launch


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def choose_ports(
    names: list[str], taken: set[int], port_range: tuple[int, int]
) -> dict[str, int] | None:
    """Free ports of this machine for a task's named ports; None when the range is used up."""
    chosen: dict[str, int] = {}
    lo, hi = port_range
    candidate = lo
    for name in names:
        while candidate <= hi and (candidate in taken or not port_free(candidate)):
            candidate += 1
        if candidate > hi:
            return None
        chosen[name] = candidate
        candidate += 1
    return chosen


def settle(
    launch: Launch, ports: dict[str, int], base_env: dict[str, str], limits: ContainerLimits
) -> tuple[list[str], dict[str, str]]:
    """On the node: the argv and the whole environment, from `base_env` (never the
    daemon's own environment), what the provider and the spec set, and the ports the
    node chose. A container engine is named by its path on this node and given `limits`."""
    env = dict(base_env)
    env.update(launch.env)
    for i, (name, port) in enumerate(ports.items()):
        if i == 0:
            env["PORT"] = str(port)
        env[f"GPUPROVIDER_PORT_{name.upper()}"] = str(port)
    container = launch.container
    if container is None:
        return launch.argv, env
    passed = set(container.env_keys) | {k for k in env if set_by_provider(k)}
    if container.gpu_uuids:  # the engine maps the devices; inside they count from 0
        passed -= set(VISIBILITY_ENV)
    argv = container_argv(container, ports, sorted(passed), limits)
    argv[0] = shutil.which(argv[0]) or argv[0]
    return argv, env
