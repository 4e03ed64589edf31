"""A pool of unprivileged system users, one per running attempt.

Why a pool rather than a user per tenant: no two live attempts ever share a uid, so no
task can signal, trace or read another's processes or files, even of the same tenant;
and once an attempt ends, whatever still runs under its uid is its own and is killed
with its cgroup before the uid is lent again. Users are created on first need
(`gpp-task-0`, `gpp-task-1`, ...), with no home, no shell and no password.

A uid is lent through a lease file (created exclusively) in the provider's own folder;
the runner gives it back when the attempt is over and its cgroup is empty, and the
daemon does when it finds a runner gone.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import signal
import stat
import subprocess
import time
from dataclasses import dataclass

PREFIX = "gpp-task-"
NOLOGIN = next(
    (p for p in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false") if os.path.exists(p)),
    "/bin/false",
)


class UserError(OSError):
    """No user could be lent (creating one failed); the message says why."""


@dataclass(frozen=True)
class TaskUser:
    name: str
    uid: int
    gid: int
    lease: str  # the lease file to remove when the attempt is over


def _create(name: str) -> None:
    argv = ["useradd", "--system", "--user-group", "--no-create-home"]
    argv += ["--home-dir", "/nonexistent", "--shell", NOLOGIN, "--comment", "gpuprovider task"]
    done = subprocess.run([*argv, name], capture_output=True, text=True, timeout=60)
    if done.returncode not in (0, 9):  # 9: it exists (another provider made it meanwhile)
        raise UserError(f"cannot create user {name}: {done.stderr.strip() or done.returncode}")


def lend(lease_dir: str, holder: str) -> TaskUser:
    """A pool user no live attempt holds, leased to `holder` (creating one if needed)."""
    os.makedirs(lease_dir, mode=0o700, exist_ok=True)
    index = 0
    while True:
        name = f"{PREFIX}{index}"
        lease = os.path.join(lease_dir, name)
        try:
            fd = os.open(lease, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            index += 1
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(holder)
        try:
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                _create(name)
                entry = pwd.getpwnam(name)
        except (UserError, KeyError, OSError, subprocess.TimeoutExpired) as exc:
            give_back(lease)
            raise UserError(f"cannot lend user {name}: {exc}") from None
        return TaskUser(name, entry.pw_uid, entry.pw_gid, lease)


@functools.lru_cache(maxsize=4096)
def pool_uid(uid: int) -> bool:
    """Whether `uid` is one of the pool's users."""
    return _pool_uid(uid)


def _pool_uid(uid: int) -> bool:
    try:
        return pwd.getpwuid(uid).pw_name.startswith(PREFIX)
    except KeyError:
        return False


def hand_over(folder: str, uid: int, gid: int) -> int:
    """Give what earlier attempts of a task left in its own work folder (owned by the
    pool users they ran as) to this attempt's user, so that a retry lent another user
    can still read it. Links are not followed; only entries a pool user owns change
    hands; a file with other hard links stays as it is (it may be someone else's).
    How many entries changed hands."""
    moved = 0
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            path = os.path.join(root, name)
            found = os.lstat(path)
            if found.st_uid == uid or not _pool_uid(found.st_uid):
                continue
            if stat.S_ISREG(found.st_mode) and found.st_nlink > 1:
                continue
            os.lchown(path, uid, gid)
            moved += 1
    return moved


def give_back(lease: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lease)


def processes_of(uid: int) -> list[int]:
    """Every process whose real or effective uid is `uid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        status = f"/proc/{entry}/status"
        with contextlib.suppress(OSError, ValueError, IndexError), open(status) as handle:
            for line in handle:
                if line.startswith("Uid:"):
                    real, effective = line.split()[1:3]
                    if uid in (int(real), int(effective)):
                        found.append(int(entry))
                    break
    return found


def kill_all(uid: int, wait_s: float = 10.0) -> bool:
    """Kill every process of `uid` (where no cgroup holds them); True once none is left."""
    deadline = time.monotonic() + wait_s
    while pids := processes_of(uid):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def holder_of(lease: str) -> str:
    try:
        with open(lease) as handle:
            return handle.read()
    except OSError:
        return ""
