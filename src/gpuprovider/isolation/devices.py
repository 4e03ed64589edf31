"""The device nodes a task may open: the ordinary ones, NVIDIA's control nodes, and its
own GPUs. Two ways to enforce it: cgroup v1 `devices.allow` lines (everything else is
denied by the kernel), or, where the v1 devices controller is missing (cgroup v2), a
mount namespace of the task's own whose /dev holds only those nodes (`namespace.py`)."""

from __future__ import annotations

import os

NVIDIA_MAJOR = 195  # /dev/nvidia<minor>; 255 is nvidiactl, 254 nvidia-modeset
ORDINARY = (
    "c 1:3 rwm",  # null
    "c 1:5 rwm",  # zero
    "c 1:7 rwm",  # full
    "c 1:8 rwm",  # random
    "c 1:9 rwm",  # urandom
    "c 5:0 rwm",  # tty
    "c 5:2 rwm",  # ptmx
    "c 136:* rwm",  # pts
)

# /dev entries a confined task sees: the ordinary nodes, then NVIDIA's control nodes.
ORDINARY_NODES = ("null", "zero", "full", "random", "urandom", "tty")
NVIDIA_CONTROL_NODES = ("nvidiactl", "nvidia-modeset", "nvidia-uvm", "nvidia-uvm-tools")


def majors(name: str, proc_devices: str = "/proc/devices") -> list[int]:
    """The major numbers the kernel lists for a driver (e.g. nvidia-uvm), if loaded."""
    try:
        with open(proc_devices) as handle:
            return [
                int(parts[0])
                for line in handle
                if len(parts := line.split()) == 2 and parts[0].isdigit() and parts[1] == name
            ]
    except OSError:
        return []


def allowed(gpu_minors: list[int], proc_devices: str = "/proc/devices") -> tuple[str, ...]:
    """What a task with these GPUs (their device minor numbers) may open."""
    lines = list(ORDINARY)
    lines += [f"c {NVIDIA_MAJOR}:255 rwm", f"c {NVIDIA_MAJOR}:254 rwm"]
    for major in majors("nvidia-uvm", proc_devices):  # uvm and uvm-tools
        lines += [f"c {major}:0 rwm", f"c {major}:1 rwm"]
    lines += [f"c {NVIDIA_MAJOR}:{minor} rwm" for minor in sorted(set(gpu_minors))]
    return tuple(lines)


def nodes(gpu_minors: list[int], dev: str = "/dev") -> list[str]:
    """The /dev entries a task with these GPUs keeps in its own /dev, of those that exist."""
    names = [*ORDINARY_NODES, *NVIDIA_CONTROL_NODES]
    names += [f"nvidia{minor}" for minor in sorted(set(gpu_minors))]
    return [name for name in names if os.path.exists(os.path.join(dev, name))]
