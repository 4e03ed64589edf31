"""A cgroup per attempt: memory, CPU, process count and device limits, and a way to kill
everything in it, on cgroup v2 or on the v1 hierarchy.

`found()` says which hierarchy this machine offers (v1 where controllers are mounted
per controller, as on hybrid systems; v2 where the unified hierarchy has them). The
daemon's side makes an attempt's cgroup with its limits (`create`); the task's process
joins it before it runs its command (`join`, in the forked child, as root); the runner
kills whatever is left in it when the command ends, and removes it (`kill_and_remove`).
A task cannot leave its cgroup (the files are root's), so `setsid`, double forks and
a killed runner leave nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field

PARENT = "gpuprovider"
V1_CONTROLLERS = ("memory", "cpu", "pids", "devices", "freezer")
V2_CONTROLLERS = ("memory", "cpu", "pids")
EMPTY_WAIT_S = 10.0  # how long to wait for a killed cgroup's processes to be gone


class CgroupError(OSError):
    """The cgroup could not be made or set; the message says which file and why."""


@dataclass(frozen=True)
class Hierarchy:
    version: str  # "v1", "v2", or "" when neither is usable
    # controller (v2: "") -> the folder attempts' cgroups go under: on v1 the daemon's own
    # cgroup (so tasks stay within whatever limits the daemon itself is under); on v2 the
    # root of the hierarchy (a cgroup holding processes cannot delegate controllers).
    mounts: dict[str, str] = field(default_factory=dict)
    why_not: str = ""  # when unusable: why

    @property
    def usable(self) -> bool:
        return bool(self.version)


def _mounts() -> list[tuple[str, str, list[str]]]:
    """(mount point, type, options) of every cgroup mount."""
    found = []
    with open("/proc/self/mounts") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
                found.append((parts[1], parts[2], parts[3].split(",")))
    return found


def _own_v1_paths() -> dict[str, str]:
    """controller -> this process's cgroup in the v1 hierarchy of that controller."""
    own: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/self/cgroup") as handle:
        for line in handle:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(","):
                if controller:
                    own[controller] = path
    return own


def found(prefer: str = "auto") -> Hierarchy:
    """The hierarchy to use: `prefer` ("auto", "v1", "v2" or "none") if it is usable."""
    if prefer == "none":
        return Hierarchy("", why_not='off in config ([isolation] cgroups = "none")')
    try:
        mounts = _mounts()
    except OSError as exc:
        return Hierarchy("", why_not=f"cannot read /proc/self/mounts: {exc.strerror}")
    v1: dict[str, str] = {}
    for point, kind, options in mounts:
        if kind == "cgroup":
            for controller in V1_CONTROLLERS:
                if controller in options:
                    v1.setdefault(controller, point)
    v2_point = next((p for p, kind, _ in mounts if kind == "cgroup2"), None)
    v2_controllers: set[str] = set()
    if v2_point:
        with contextlib.suppress(OSError), open(os.path.join(v2_point, "cgroup.controllers")) as f:
            v2_controllers = set(f.read().split())
    reasons = []
    own = _own_v1_paths()
    v1 = {c: os.path.join(point, own.get(c, "/").lstrip("/")) for c, point in v1.items()}
    if prefer in ("auto", "v1"):
        missing = [c for c in V1_CONTROLLERS if c not in v1]
        unwritable = [c for c, p in v1.items() if not os.access(p, os.W_OK)]
        if not missing and not unwritable:
            return Hierarchy("v1", v1)
        trouble = (
            f"no {', '.join(missing)}" if missing else f"not writable: {', '.join(unwritable)}"
        )
        reasons.append(f"v1: {trouble}")
    if prefer in ("auto", "v2"):
        missing = [c for c in V2_CONTROLLERS if c not in v2_controllers]
        if v2_point and not missing and os.access(v2_point, os.W_OK):
            return Hierarchy("v2", {"": v2_point})
        if not v2_point:
            reasons.append("v2: not mounted")
        elif missing:
            reasons.append(f"v2: controllers missing: {', '.join(missing)}")
        else:
            reasons.append("v2: not writable")
    return Hierarchy("", why_not="; ".join(reasons))


@dataclass(frozen=True)
class Limits:
    memory_bytes: int | None  # None: no memory limit (best-effort work)
    cpu_milli: int  # the CPU reserved: its weight, and its cap with `cpu_quota`
    cpu_quota: bool
    pids_max: int
    devices: tuple[str, ...] | None  # v1 `devices.allow` lines; None: devices not limited


def paths(hierarchy: Hierarchy, name: str) -> dict[str, str]:
    """controller -> the attempt's cgroup folder (v2: one folder, key "")."""
    return {c: os.path.join(point, PARENT, name) for c, point in hierarchy.mounts.items()}


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as handle:
            handle.write(value)
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror}") from None


def create(hierarchy: Hierarchy, name: str, limits: Limits) -> dict[str, str]:
    """Make the attempt's cgroup with its limits; controller -> folder."""
    made = paths(hierarchy, name)
    for controller, path in made.items():
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        if hierarchy.version == "v2":
            wanted = " ".join(f"+{c}" for c in V2_CONTROLLERS)
            _write(os.path.join(os.path.dirname(parent), "cgroup.subtree_control"), wanted)
            _write(os.path.join(parent, "cgroup.subtree_control"), wanted)
        elif controller == "memory":  # nested groups count toward their parent's usage
            with contextlib.suppress(OSError):
                _write(os.path.join(parent, "memory.use_hierarchy"), "1")
        os.makedirs(path, exist_ok=True)
    if hierarchy.version == "v2":
        folder = made[""]
        if limits.memory_bytes is not None:
            _write(os.path.join(folder, "memory.max"), str(limits.memory_bytes))
            with contextlib.suppress(CgroupError):  # no swap to escape to, where swap exists
                _write(os.path.join(folder, "memory.swap.max"), "0")
        _write(os.path.join(folder, "cpu.weight"), str(max(1, min(10_000, limits.cpu_milli // 10))))
        if limits.cpu_quota and limits.cpu_milli:
            _write(os.path.join(folder, "cpu.max"), f"{limits.cpu_milli * 100} 100000")
        _write(os.path.join(folder, "pids.max"), str(limits.pids_max))
        return made
    if limits.memory_bytes is not None:
        _write(os.path.join(made["memory"], "memory.limit_in_bytes"), str(limits.memory_bytes))
    _write(os.path.join(made["cpu"], "cpu.shares"), str(max(2, limits.cpu_milli * 1024 // 1000)))
    if limits.cpu_quota and limits.cpu_milli:
        _write(os.path.join(made["cpu"], "cpu.cfs_period_us"), "100000")
        _write(os.path.join(made["cpu"], "cpu.cfs_quota_us"), str(limits.cpu_milli * 100))
    _write(os.path.join(made["pids"], "pids.max"), str(limits.pids_max))
    if limits.devices is not None:
        _write(os.path.join(made["devices"], "devices.deny"), "a")
        for line in limits.devices:
            _write(os.path.join(made["devices"], "devices.allow"), line)
    return made


def join(folders: dict[str, str]) -> None:
    """Move the calling process into the attempt's cgroup (in the task's child, as root,
    before it drops its privileges)."""
    me = str(os.getpid())
    for folder in folders.values():
        _write(os.path.join(folder, "cgroup.procs"), me)


def members(folders: dict[str, str]) -> set[int]:
    found_pids: set[int] = set()
    for folder in folders.values():
        with contextlib.suppress(OSError), open(os.path.join(folder, "cgroup.procs")) as handle:
            found_pids.update(int(line) for line in handle if line.strip())
    return found_pids


def out_of_memory(folders: dict[str, str]) -> bool:
    """Whether the kernel killed a process of the cgroup for its memory limit."""
    for controller, folder in folders.items():
        if controller not in ("memory", ""):
            continue
        name = "memory.events" if controller == "" else "memory.oom_control"
        with contextlib.suppress(OSError), open(os.path.join(folder, name)) as handle:
            for line in handle:
                key, _, value = line.partition(" ")
                if key == "oom_kill" and value.strip().isdigit() and int(value) > 0:
                    return True
        failcnt = os.path.join(folder, "memory.failcnt")
        with contextlib.suppress(OSError, ValueError), open(failcnt) as handle:
            if int(handle.read()) > 0:
                return True
    return False


def kill_and_remove(folders: dict[str, str], wait_s: float = EMPTY_WAIT_S) -> bool:
    """Kill every process in the cgroup, wait until it is empty, remove it. True when it
    is gone (or was never there)."""
    if not any(os.path.isdir(f) for f in folders.values()):
        return True
    freezer = folders.get("freezer")
    kill_file = os.path.join(folders.get("", ""), "cgroup.kill") if "" in folders else ""
    deadline = time.monotonic() + wait_s
    while True:
        if kill_file and os.path.exists(kill_file):
            with contextlib.suppress(CgroupError):
                _write(kill_file, "1")
        else:
            if freezer:  # freeze first, so nothing forks while it is being killed
                with contextlib.suppress(CgroupError):
                    _write(os.path.join(freezer, "freezer.state"), "FROZEN")
            for pid in members(folders):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if freezer:
                with contextlib.suppress(CgroupError):
                    _write(os.path.join(freezer, "freezer.state"), "THAWED")
        if not members(folders):
            break
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    gone = True
    for folder in folders.values():
        try:
            os.rmdir(folder)
        except FileNotFoundError:
            pass
        except OSError:
            gone = False
    return gone
