"""The device nodes a task may open: the ordinary ones, NVIDIA's control nodes, and its
own GPUs. Two ways to enforce it: cgroup v1 `devices.allow` lines (everything else is
denied by the kernel), or, where the v1 devices controller is missing (cgroup v2), a
mount namespace of the task's own whose /dev holds only those nodes (`confine`)."""

from __future__ import annotations

import ctypes
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
SHM_SIZE = "50%"  # of the machine's memory; what a task writes there counts in its cgroup

# From <sched.h> and <sys/mount.h>.
CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
_libc = ctypes.CDLL(None, use_errno=True)


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


def _call(what: str, result: int) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str, target: str, kind: str | None, flags: int, data: str = "") -> None:
    _call(
        f"mount {target}",
        _libc.mount(
            source.encode(),
            target.encode(),
            kind.encode() if kind else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
    )


def confine(names: list[str], dev: str = "/dev") -> None:
    """Give the calling process (the task's child, as root, before it becomes the task's
    user) a mount namespace of its own whose `dev` is a fresh read-only tmpfs holding
    only `names` (bind mounts of the host's nodes), the host's pts and a /dev/shm of its
    own. Nothing it mounts propagates back to the host."""
    _call("unshare the mount namespace", _libc.unshare(CLONE_NEWNS))
    _mount("none", "/", None, MS_REC | MS_PRIVATE)
    # The host's nodes (in the new namespace's copy of its mounts), held open before
    # anything covers them: their bind sources.
    held = {name: os.open(os.path.join(dev, name), os.O_PATH) for name in names}
    pts = os.open(os.path.join(dev, "pts"), os.O_PATH | os.O_DIRECTORY)
    try:
        _mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=1m")
        for name, fd in held.items():
            target = os.path.join(dev, name)
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o600))
            _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
        os.mkdir(os.path.join(dev, "pts"), 0o755)
        _mount(f"/proc/self/fd/{pts}", os.path.join(dev, "pts"), None, MS_BIND | MS_REC)
        os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
        os.mkdir(os.path.join(dev, "shm"), 0o1777)
        flags = MS_NOSUID | MS_NODEV
        _mount("tmpfs", os.path.join(dev, "shm"), "tmpfs", flags, f"mode=1777,size={SHM_SIZE}")
        os.symlink("/proc/self/fd", os.path.join(dev, "fd"))
        for number, name in enumerate(("stdin", "stdout", "stderr")):
            os.symlink(f"/proc/self/fd/{number}", os.path.join(dev, name))
        _mount("none", dev, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    finally:
        for fd in [*held.values(), pts]:
            os.close(fd)
