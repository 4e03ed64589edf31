"""Tasks given as a container image: the engine that answers, and the command that runs
one attempt."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from functools import cache

ENGINES = ("docker", "podman")


ENGINE_TTL_S = 60.0  # an engine started (or stopped) since is noticed within this


class EngineProbe:
    """The container engine `[executor] container_engine` allows, asked again at most
    every ENGINE_TTL_S: an engine that was down at start is found once it answers, and
    one that stopped is no longer offered. Called on worker threads only (it may wait
    for `ENGINE info`)."""

    def __init__(self, choice: str = "auto", ttl_s: float = ENGINE_TTL_S):
        self.choice, self.ttl_s = choice, ttl_s
        self._found: tuple[float, str | None] | None = None
        self._lock = threading.Lock()

    def __call__(self) -> str | None:
        with self._lock:
            if self._found is None or time.monotonic() - self._found[0] > self.ttl_s:
                self._found = (time.monotonic(), find_engine(self.choice))
            return self._found[1]


@cache
def container_engine(choice: str = "auto") -> str | None:
    """The engine found first (`find_engine`), remembered for the process."""
    return find_engine(choice)


def find_engine(choice: str = "auto") -> str | None:
    """The container engine to use: `choice` if it answers (`ENGINE info` succeeds),
    or with "auto" the first of docker and podman that does; "none": never one."""
    if choice == "none":
        return None
    for engine in ENGINES if choice == "auto" else (choice,):
        if shutil.which(engine) is None:
            continue
        try:
            done = subprocess.run(
                [engine, "info"], capture_output=True, timeout=10, stdin=subprocess.DEVNULL
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return engine
    return None


@dataclass
class ContainerLaunch:
    """What the node needs to build `docker run` (or `podman run`) for one attempt."""

    engine: str
    name: str
    image: str  # a reference the spec validated: never an option
    args: list[str]  # the container's own arguments, after the image
    env_keys: list[str]  # passed by name (`-e KEY`): values never appear on a command line
    gpu_uuids: list[str]  # real GPUs only: a simulated GPU is nothing to hand an engine
    workdir: str | None
    runtime: str = ""  # the engine's OCI runtime ("": its default)
    read_only: bool = True
    # Folders and files of the node the provider binds in (source, target, read-only):
    # a rental's disk, home and host key. Never from a spec.
    mounts: list[tuple[str, str, bool]] = field(default_factory=list)
    passwd_entry: str = ""  # podman's --passwd-entry: the user a rental logs in as


@dataclass(frozen=True)
class ContainerLimits:
    """Set on the node: who the container runs as, and what it may use."""

    user: str | None  # "uid:gid" of the attempt's pool user; None: the image's user
    memory_bytes: int | None
    cpu_milli: int
    cpu_quota: bool
    pids_max: int


def container_argv(
    c: ContainerLaunch, ports: dict[str, int], env_keys: list[str], limits: ContainerLimits
) -> list[str]:
    """`docker run` for one attempt. Only the provider's own options come before `--`;
    the image and its arguments after it, so tenant input is never an engine option: no
    privileges, no host namespaces or mounts, all capabilities dropped, the root
    filesystem read-only where the image allows, exactly the attempt's GPUs."""
    argv = [c.engine, "run", "--rm", "--init", "--name", c.name]
    argv += ["--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    argv += ["--pids-limit", str(limits.pids_max)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # what any task here gets
    argv += ["--ulimit", f"nofile={soft}:{hard}"]
    argv += ["--ulimit", f"nproc={limits.pids_max}:{limits.pids_max}"]  # its user's processes
    if c.read_only:
        argv += ["--read-only"]
    if limits.memory_bytes is not None:
        argv += ["--memory", f"{limits.memory_bytes}b"]
    if limits.cpu_quota and limits.cpu_milli:
        argv += ["--cpus", f"{limits.cpu_milli / 1000:g}"]
    else:
        argv += ["--cpu-shares", str(max(2, limits.cpu_milli * 1024 // 1000))]
    if limits.user:
        argv += ["--user", limits.user]
    if c.runtime:
        argv += ["--runtime", c.runtime]
    for key in env_keys:
        argv += ["-e", key]
    if c.gpu_uuids:
        if os.path.basename(c.engine) == "podman":  # CDI names (nvidia-ctk cdi generate)
            argv += [arg for uuid in c.gpu_uuids for arg in ("--device", f"nvidia.com/gpu={uuid}")]
        else:  # the NVIDIA runtime maps exactly these; inside they count from 0
            argv += ["--gpus", '"device=' + ",".join(c.gpu_uuids) + '"']
    for port in ports.values():
        argv += ["-p", f"{port}:{port}"]
    if c.workdir:
        argv += ["-w", c.workdir]
    for source, target, read_only in c.mounts:
        argv += ["--mount", f"type=bind,src={source},dst={target}" + (",ro" if read_only else "")]
    if c.passwd_entry:
        argv += ["--passwd-entry", c.passwd_entry]
    return [*argv, "--", c.image, *c.args]
