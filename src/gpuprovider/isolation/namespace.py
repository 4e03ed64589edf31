"""A mount and IPC namespace of the task's own, entered by the task's child as root just
before it becomes the task's user. What it changes, for the task and nothing else:

- `/tmp`, `/var/tmp`, `/run/lock` and `/dev/shm` (writable by anyone on the host) are
  fresh tmpfs mounts: a task cannot leave files for another task, read what another
  left there, or fill the host's; their pages count toward its memory cgroup, and they
  are gone with its last process. NVIDIA's MPS pipe folder (`/tmp/nvidia-mps`) is kept,
  so fractional-GPU tasks still reach the MPS daemon.
- `/proc` is a new instance with `hidepid=invisible`: the task sees only its own
  processes (not another tenant's command line, nor the daemon's).
- SysV IPC and POSIX message queues are its own (CLONE_NEWIPC).
- Its working folder (`workdir`: its own, or one under the operator's `workdir_roots`)
  is reachable by its absolute path, even where it lies in a folder the task's user may
  not enter (the provider's home in `/root`) or in one made private above (`/tmp`): the
  first such folder on the way is covered by an empty tmpfs, and the working folder is
  bound at its place in it. What else was in that folder (the provider's home, other
  tasks' folders) is not there at all.
- Its volumes (`mounts`: a folder on the node, the absolute path the task sees it at)
  are bound at their paths, made as empty folders where missing; a path that goes
  through a link is refused (the task may have made it, to have root make folders
  elsewhere).
- With `dev_nodes`, `/dev` is a fresh read-only tmpfs holding only those nodes (bind
  mounts of the host's), the host's pts and its own shm: how a task is kept to its own
  GPUs where there is no cgroup v1 devices controller (cgroup v2).

Nothing mounted here propagates back to the host (the whole tree is made private first).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat
import subprocess
import sys

PRIVATE_FOLDERS = ("/tmp", "/var/tmp", "/run/lock", "/dev/shm")
KEPT_IN_TMP = ("nvidia-mps",)  # MPS's pipe folder (CUDA_MPS_PIPE_DIRECTORY's default)
PROBE_TIMEOUT_S = 30.0
TMPFS_SIZE = "50%"  # of the machine's memory; the task's memory cgroup caps it sooner

# From <sched.h> and <sys/mount.h>.
CLONE_NEWNS, CLONE_NEWIPC = 0x00020000, 0x08000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
_libc = ctypes.CDLL(None, use_errno=True)


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


def _tmpfs(target: str, mode: str = "1777") -> None:
    _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode},size={TMPFS_SIZE}")


def _mkdir(path: str, mode: int) -> None:
    """A folder with exactly `mode`, whatever the daemon's umask (0o077) would leave."""
    os.mkdir(path)
    os.chmod(path, mode)


def _bind_from(fd: int, target: str, flags: int = 0) -> None:
    """Bind what `fd` (an O_PATH handle opened in this namespace) is onto `target`."""
    _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | flags)


def enter(
    dev_nodes: list[str] | None = None,
    workdir: str = "",
    dev: str = "/dev",
    mounts: list[list[str]] | None = None,
) -> None:
    """Give the calling process the namespace described above."""
    _call("unshare", _libc.unshare(CLONE_NEWNS | CLONE_NEWIPC))
    _mount("none", "/", None, MS_REC | MS_PRIVATE)
    # What must stay reachable once covered, held open (in this namespace's copy of the
    # mounts) as bind sources.
    held: dict[str, int] = {}
    with contextlib.ExitStack() as closing:
        for name in KEPT_IN_TMP:
            with contextlib.suppress(OSError):
                held[f"/tmp/{name}"] = os.open(f"/tmp/{name}", os.O_PATH | os.O_DIRECTORY)
        for name in dev_nodes or ():
            held[os.path.join(dev, name)] = os.open(os.path.join(dev, name), os.O_PATH)
        if dev_nodes is not None:
            held[os.path.join(dev, "pts")] = os.open(os.path.join(dev, "pts"), os.O_PATH)
        work = os.open(workdir, os.O_PATH | os.O_DIRECTORY) if workdir else None
        volumes = [(os.open(src, os.O_PATH | os.O_DIRECTORY), dst) for src, dst in mounts or []]
        opened = [*held.values(), *([work] if work is not None else [])]
        for fd in [*opened, *(fd for fd, _ in volumes)]:
            closing.callback(os.close, fd)
        if dev_nodes is not None:
            _own_dev(dev, held)
        for folder in PRIVATE_FOLDERS:
            if os.path.isdir(folder):
                _tmpfs(folder)
        for path, fd in held.items():
            if path.startswith("/tmp/"):
                _mkdir(path, 0o755)
                _bind_from(fd, path, MS_REC)
        flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
        _mount("proc", "/proc", "proc", flags, "hidepid=invisible")
        if dev_nodes is not None:
            _mount("none", dev, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
        if work is not None:
            _reach(work, workdir)
        for fd, target in volumes:
            _make_plain(target)
            _bind_from(fd, target, MS_REC)
        if work is not None:
            os.chdir(workdir)


def _make_plain(path: str) -> None:
    """Make folder `path` (and those above it) unless there; OSError when any part of
    the way is a link."""
    way = "/"
    for part in os.path.normpath(path).strip("/").split("/"):
        way = os.path.join(way, part)
        try:
            found = os.lstat(way)
        except FileNotFoundError:
            _mkdir(way, 0o755)
            continue
        if stat.S_ISLNK(found.st_mode) or not stat.S_ISDIR(found.st_mode):
            raise OSError(f"cannot mount a volume at {path}: {way} is not a folder")


def _reach(fd: int, workdir: str) -> None:
    """Make `workdir` (held as `fd`) reachable by its path for anyone, and go there."""
    parts = os.path.normpath(workdir).strip("/").split("/")
    first = len(parts) - 1  # the first folder on the way to make, in a tmpfs
    for depth in range(1, len(parts)):
        folder = "/" + "/".join(parts[:depth])
        try:
            if os.stat(folder).st_mode & 0o001:
                continue  # anyone may pass through
            _tmpfs(folder, mode="0711")
            first = depth
        except FileNotFoundError:  # under a private folder
            first = depth - 1
        break
    else:
        if os.path.isdir(workdir):
            os.chdir(workdir)
            return
    for more in range(first, len(parts)):
        _mkdir("/" + "/".join(parts[: more + 1]), 0o711)
    _bind_from(fd, workdir)
    os.chdir(workdir)


def _own_dev(dev: str, held: dict[str, int]) -> None:
    """A fresh `dev` holding only the held nodes under it, the host's pts, and links."""
    _mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=1m")
    for path, fd in held.items():
        if os.path.dirname(path) != dev or path.endswith("/pts"):
            continue
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        _bind_from(fd, path)
    _mkdir(os.path.join(dev, "pts"), 0o755)
    _bind_from(held[os.path.join(dev, "pts")], os.path.join(dev, "pts"), MS_REC)
    os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
    _mkdir(os.path.join(dev, "shm"), 0o1777)  # made a tmpfs with the other folders
    os.symlink("/proc/self/fd", os.path.join(dev, "fd"))
    for number, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{number}", os.path.join(dev, name))


def refused() -> str:
    """Why this machine will not give a task such a namespace (a daemon in a container
    without CAP_SYS_ADMIN, a kernel without `hidepid=invisible`); "" when it will. Tried
    once, in a process of its own."""
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-c", f"from {__name__} import enter; enter([])"],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=PROBE_TIMEOUT_S,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot try it: {exc}"
    if done.returncode == 0:
        return ""
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else f"the trial exited {done.returncode}"
