"""Tasks given as a container image: found engine, and the command that runs one."""

from __future__ import annotations

import shutil
import subprocess
from functools import cache

ENGINES = ("docker", "podman")


@cache
def container_engine() -> str | None:
    """The container engine that answers on this machine (`docker info` succeeds), if any."""
    for engine in ENGINES:
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


def container_argv(
    engine: str,
    name: str,
    image: str,
    args: list[str],
    env_keys: list[str],
    gpu_indices: list[int],
    real_gpus: bool,
    ports: dict[str, int],
    workdir: str | None,
) -> list[str]:
    """`docker run` for one attempt. Values of `env_keys` come from the runner's
    environment (`-e KEY`), so they never appear on a command line."""
    argv = [engine, "run", "--rm", "--init", "--name", name]
    for key in env_keys:
        argv += ["-e", key]
    if real_gpus and gpu_indices:
        # The NVIDIA runtime maps exactly these devices; inside they count from 0.
        argv += ["--gpus", f"device={','.join(map(str, gpu_indices))}"]
    for port in ports.values():
        argv += ["-p", f"{port}:{port}"]
    if workdir:
        argv += ["-w", workdir]
    return [*argv, image, *args]
