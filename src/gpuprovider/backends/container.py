"""Tasks given as a container image: the engine that answers, and the command that runs
one attempt."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from functools import cache

ENGINES = ("docker", "podman")


@cache
def container_engine(choice: str = "auto") -> str | None:
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
    """What the node needs to build `docker run` for one attempt."""

    engine: str
    name: str
    image: str
    args: list[str]
    env_keys: list[str]  # passed by name (`-e KEY`): values never appear on a command line
    gpu_indices: list[int]
    real_gpus: bool
    workdir: str | None


def container_argv(c: ContainerLaunch, ports: dict[str, int], env_keys: list[str]) -> list[str]:
    """`docker run` for one attempt, with the ports the node chose."""
    argv = [c.engine, "run", "--rm", "--init", "--name", c.name]
    for key in env_keys:
        argv += ["-e", key]
    if c.real_gpus and c.gpu_indices:
        # The NVIDIA runtime maps exactly these devices; inside they count from 0.
        argv += ["--gpus", f"device={','.join(map(str, c.gpu_indices))}"]
    for port in ports.values():
        argv += ["-p", f"{port}:{port}"]
    if c.workdir:
        argv += ["-w", c.workdir]
    return [*argv, c.image, *c.args]
