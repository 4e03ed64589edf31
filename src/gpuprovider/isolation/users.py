"""A pool of unprivileged system users, one per running attempt.

Why a pool rather than a user per tenant: no two live attempts ever share a uid, so no
task can signal, trace or read another's processes or files, even of the same tenant;
and once an attempt ends, whatever still runs under its uid is its own and is killed
with its cgroup before the uid is lent again. Users are created on first need
(`gpp-task-0`, `gpp-task-1`, ...), with no home, no shell and no password.

A uid is lent through the machine's one lease table (`TABLE`, in /run: gone at reboot,
with every process that could hold a uid), shared by every provider home and Ray node
on the machine: two providers on one host never lend one uid at once. A lease is a
file named after the user, holding the home that took it, the attempt and a random
token; lending and giving back hold the table's lock (fcntl). Only the holder of the
token gives a lease back or kills what runs under its uid, so an attempt cleaned up
twice (by its runner, then by a daemon that finds the runner gone, or by a test) never
reaps a uid lent since to another home's task. The runner gives its user back when the
attempt is over and its cgroup is empty, and the daemon does when it finds a runner
gone; `sweep` frees the leases of homes that no longer exist.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import pwd
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

PREFIX = "gpp-task-"
TABLE = "/run/gpuprovider/users"  # the machine's lease table
LOCK_NAME = ".lock"
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
    token: str  # proves the lease is still this attempt's


def _create(name: str) -> None:
    argv = ["useradd", "--system", "--user-group", "--no-create-home"]
    argv += ["--home-dir", "/nonexistent", "--shell", NOLOGIN, "--comment", "gpuprovider task"]
    done = subprocess.run([*argv, name], capture_output=True, text=True, timeout=60)
    if done.returncode not in (0, 9):  # 9: it exists (another provider made it meanwhile)
        raise UserError(f"cannot create user {name}: {done.stderr.strip() or done.returncode}")


@contextlib.contextmanager
def _locked(table: str):
    """The table's lock, held across a lend or a give-back, by any process of any home."""
    os.makedirs(table, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(table, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def lend(table: str, home: str, holder: str) -> TaskUser:
    """A pool user no live attempt on this machine holds, leased to `holder` (an attempt
    of `home`), creating one if needed."""
    token = os.urandom(16).hex()
    with _locked(table):
        held = set(os.listdir(table))
        index = 0
        while f"{PREFIX}{index}" in held:
            index += 1
        name = f"{PREFIX}{index}"
        lease = os.path.join(table, name)
        fd = os.open(lease, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"home": home, "holder": holder, "token": token}, handle)
    try:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            _create(name)
            entry = pwd.getpwnam(name)
    except (UserError, KeyError, OSError, subprocess.TimeoutExpired) as exc:
        give_back(lease, token)
        raise UserError(f"cannot lend user {name}: {exc}") from None
    return TaskUser(name, entry.pw_uid, entry.pw_gid, lease, token)


def read_lease(lease: str) -> dict:
    """What a lease holds ({} when it is gone or unreadable)."""
    try:
        with open(lease) as handle:
            found = json.load(handle)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _holds(lease: str, token: str) -> bool:
    # A lease from before the table (a per-home folder) carries no token: its own.
    return not token or read_lease(lease).get("token") == token


def give_back(lease: str, token: str = "") -> None:
    """End the lease, if it is still `token`'s."""
    with holding(lease, token) as held:
        if held:
            end(lease)


@contextlib.contextmanager
def holding(lease: str, token: str) -> Iterator[bool]:
    """The table locked, and whether `token` still holds `lease`: what is done to the
    lease's uid (kill what runs as it, lift its network rules) is done in here, only
    when it does, so that a uid lent since to another attempt, of this home or another,
    is left alone."""
    with _locked(os.path.dirname(lease)):
        yield _holds(lease, token)


def end(lease: str) -> None:
    """Remove the lease (inside `holding`, when held)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lease)


def adopt_legacy(folder: str, home: str, table: str = TABLE) -> int:
    """Enter in the machine's table the leases a provider of before the table keeps in
    its own `folder` (`<home>/.users`): attempts it started still hold those users, and
    no other home may be lent them. The entry lasts as long as the old lease file (which
    the old attempt's clean-up removes); `sweep` ends it after. How many."""
    try:
        names = [n for n in os.listdir(folder) if n.startswith(PREFIX)]
    except FileNotFoundError:
        return 0
    adopted = 0
    with _locked(table):
        for name in names:
            old = os.path.join(folder, name)
            try:
                fd = os.open(os.path.join(table, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue  # lent already: another home's, or adopted before
            with os.fdopen(fd, "w") as handle:
                json.dump({"home": home, "holder": "", "token": "", "legacy": old}, handle)
            adopted += 1
    return adopted


def sweep(table: str = TABLE) -> int:
    """Give back the leases whose home is gone (deleted with nothing of it running: a
    test's home, a removed provider), or whose old lease file (`adopt_legacy`) was
    removed, and whose uid runs nothing; how many."""
    freed = 0
    with contextlib.suppress(FileNotFoundError), _locked(table):
        for name in os.listdir(table):
            if not name.startswith(PREFIX):
                continue
            lease = os.path.join(table, name)
            found = read_lease(lease)
            home, legacy = found.get("home"), found.get("legacy")
            home_gone = isinstance(home, str) and home and not os.path.isdir(home)
            legacy_gone = isinstance(legacy, str) and legacy and not os.path.exists(legacy)
            if not home_gone and not legacy_gone:
                continue
            with contextlib.suppress(KeyError):
                if processes_of(pwd.getpwnam(name).pw_uid):
                    continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lease)
                freed += 1
    return freed


def held_by(home: str, table: str = TABLE) -> list[str]:
    """The users `home` holds now."""
    try:
        names = os.listdir(table)
    except FileNotFoundError:
        return []
    return sorted(
        name
        for name in names
        if name.startswith(PREFIX) and read_lease(os.path.join(table, name)).get("home") == home
    )


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
