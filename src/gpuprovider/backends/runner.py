"""The task runner: a small process between the provider and a task's command.

It starts the command in its own process group, enforces the maximum duration,
turns SIGTERM into "stop the command: SIGTERM, then SIGKILL after the grace
period", and writes how the command ended to `exit-<attempt>.json`. Because it
outlives the daemon, a task that finishes while the daemon is down still has
its real exit code on record.

Standard library only (with the stdlib-only `gpuprovider.isolation`), run as
`python -I -m gpuprovider.backends.runner`, so it is the same code on every backend.
Starting a Python process per task costs ~20 ms of CPU, so the daemon keeps one
*runner server* per machine (`runner --serve SOCKET`),
started on first use, which forks a runner per attempt: a fork costs well under a
millisecond and the runner is the same code. The server outlives the daemon too,
reaps the runners it forked, and tells whoever watches (the daemon) when one ends,
so the daemon learns of an exit at once instead of at its next poll.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, cast

from gpuprovider.isolation import cgroups, namespace, network
from gpuprovider.isolation.policy import Applied, give_user_back, undo


def _version() -> str:
    """A digest of the code a runner server runs: servers of different code never mix
    (the socket name carries it)."""
    digest = hashlib.sha256()
    isolation = os.path.dirname(cgroups.__file__)
    for path in [__file__, *sorted(os.path.join(isolation, f) for f in os.listdir(isolation))]:
        if path.endswith(".py"):
            with open(path, "rb") as source:
                digest.update(source.read())
    return digest.hexdigest()[:12]


VERSION = _version()

LOG_NAME = "output.log"  # and output.log.1 before it; output.dropped counts the rest
DROPPED_NAME = "output.dropped"
IDLE_EXIT_S = 600.0  # a server with no runner and no client this long exits
SPARES = 4  # runners forked ahead of need, waiting for their task


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(data, handle)
    os.replace(tmp, path)


def _signal_all(pgid: int, sig: int, applied: Applied | None) -> None:
    """Signal the command's process group, and every process of its cgroup (those that
    left the group with `setsid` too)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    if applied is not None and applied.cgroups:
        for pid in cgroups.members(applied.cgroups):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def _become_task(applied: Applied | None) -> Callable[[], None] | None:
    """What the forked child does before it runs the command: join the attempt's cgroup
    and enter namespaces of its own (as root), then become the attempt's user, with no
    other group."""
    if applied is None or (applied.uid is None and not applied.cgroups and not applied.namespace):
        return None

    def become() -> None:
        if applied.cgroups:
            cgroups.join(applied.cgroups)
        if applied.namespace:
            namespace.enter(applied.dev_nodes, applied.workdir, mounts=applied.mounts)
        if applied.uid is not None and applied.drop_privileges:
            os.setgroups([])
            assert applied.gid is not None  # set with uid (IsolationPolicy.apply)
            os.setgid(applied.gid)
            os.setuid(applied.uid)
        os.umask(0o077)

    return become


def process_start_time(pid: int) -> float:
    """When `pid` started, in seconds since the epoch, as psutil computes it (so the
    daemon can tell this process from one that reused its pid)."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        fields = handle.read().rsplit(b")", 1)[1].split()
    ticks = int(fields[19])  # field 22 of proc(5), counted after the command name
    with open("/proc/stat", "rb") as handle:
        boot = next(int(line.split()[1]) for line in handle if line.startswith(b"btime"))
    return ticks / os.sysconf("SC_CLK_TCK") + boot


class CappedLog:
    """A task's output, kept to about `max_bytes`: the latest in `output.log`, what came
    before it in `output.log.1`, each up to half; older output is dropped, and
    `output.dropped` says how many bytes were, so that offsets count from the first
    byte the task ever wrote. A rotation holds the `output.dropped` lock, which readers
    share, so that a reader never sees the files and the count out of step."""

    def __init__(self, run_dir: str, max_bytes: int):
        self.path = os.path.join(run_dir, LOG_NAME)
        self.half = max(max_bytes // 2, 4096)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        self.counter = os.open(os.path.join(run_dir, DROPPED_NAME), os.O_RDWR | os.O_CREAT, 0o600)
        self.fd = os.open(self.path, flags, 0o600)
        self.size = os.fstat(self.fd).st_size

    def write(self, data: bytes) -> None:
        while data:
            if self.size >= self.half:
                self._rotate()
            written = os.write(self.fd, data[: self.half - self.size])
            self.size += written
            data = data[written:]

    def _rotate(self) -> None:
        older = self.path + ".1"
        fcntl.flock(self.counter, fcntl.LOCK_EX)
        try:
            dropped = _read_count(self.counter)
            with contextlib.suppress(FileNotFoundError):
                dropped += os.stat(older).st_size
            os.replace(self.path, older)
            os.close(self.fd)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self.size = 0
            os.ftruncate(self.counter, 0)
            os.pwrite(self.counter, str(dropped).encode(), 0)
        finally:
            fcntl.flock(self.counter, fcntl.LOCK_UN)
        # The runner's own messages follow the log into its new file.
        os.dup2(self.fd, 1)
        os.dup2(self.fd, 2)

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.counter)


def _read_count(fd: int) -> int:
    text = os.pread(fd, 32, 0)
    return int(text) if text.isdigit() else 0


def read_output(run_dir: str, offset: int, limit: int) -> tuple[int, bytes]:
    """Up to `limit` bytes of a task's output from `offset` (counted from the first
    byte it wrote), and where they start: later than `offset` when the bytes there were
    dropped to keep the log to its size. A negative `offset` counts back from the end
    (-4096: the last 4 KiB)."""
    dropped, files = 0, []
    try:
        counter = os.open(os.path.join(run_dir, DROPPED_NAME), os.O_RDONLY)
    except FileNotFoundError:
        counter = None  # never rotated (or written by 0.1.0): output.log is all of it
    try:
        if counter is not None:
            fcntl.flock(counter, fcntl.LOCK_SH)
            dropped = _read_count(counter)
        for name in (LOG_NAME + ".1", LOG_NAME):
            with contextlib.suppress(FileNotFoundError):
                files.append(open(os.path.join(run_dir, name), "rb"))  # noqa: SIM115
    finally:
        if counter is not None:
            os.close(counter)
    if offset < 0:
        end = dropped + sum(os.fstat(handle.fileno()).st_size for handle in files)
        offset = max(end + offset, 0)
    start = max(offset, dropped)
    pieces, position, wanted = [], dropped, limit
    for handle in files:
        with handle:
            size = os.fstat(handle.fileno()).st_size
            if wanted > 0 and (handle is files[-1] or start < position + size):
                handle.seek(max(start - position, 0))
                piece = handle.read(wanted if handle is files[-1] else min(wanted, size))
                pieces.append(piece)
                wanted -= len(piece)
            position += size
    return start, b"".join(pieces)


class Fence:
    """The node's lease as its agent last wrote it (`lease_file`: JSON with `expires`,
    epoch seconds, and `attempts`, the "<run dir>#<attempt>" the provider counts as
    running here). An attempt runs only while the lease holds and lists it: a node cut
    off from the provider stops its work when the lease runs out, before the provider
    starts it anywhere else, and one that comes back kills what was started elsewhere."""

    CHECK_S = 0.25

    def __init__(self, path: str, key: str):
        self.path, self.key = path, key
        self.seen: tuple[int, int] | None = None
        self.expires, self.listed = 0.0, False

    def why_not(self, now: float) -> str:
        """Why the attempt may not run now; "" while it may."""
        try:
            info = os.stat(self.path)
            if (info.st_mtime_ns, info.st_size) != self.seen:
                with open(self.path, "rb") as source:
                    lease = json.loads(source.read(1 << 24))
                self.seen = (info.st_mtime_ns, info.st_size)
                self.expires = float(lease["expires"])
                self.listed = self.key in lease["attempts"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"the node's lease cannot be read ({type(exc).__name__})"
        if now > self.expires:
            return "the node's lease from the provider ran out"
        if not self.listed:
            return "the provider no longer runs this attempt here"
        return ""


def run(
    command: list[str],
    run_dir: str,
    attempt: int,
    grace_s: float,
    max_duration_s: float,
    env: dict[str, str] | None = None,
    applied: Applied | None = None,
    log_max_bytes: int = 64 << 20,
    lease_file: str = "",
) -> int:
    """Run one attempt of a task's command to its end (as its user, in its cgroup, when
    `applied` says so), its output copied into a capped log, record how it ended, and
    undo what was applied. With `lease_file`, only while the node's lease holds: fenced
    off, the command is killed at once (it is presumed lost, and run elsewhere)."""
    exit_path = os.path.join(run_dir, f"exit-{attempt}.json")
    fence = Fence(lease_file, f"{run_dir}#{attempt}") if lease_file else None
    started = time.time()
    stop: dict[str, Any] = {"reason": "", "deadline": 0.0}
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())

    def request_stop(signum: int, _frame: object) -> None:
        if not stop["reason"]:
            stop["reason"] = "stopped"

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    log = CappedLog(run_dir, log_max_bytes)
    output_r, output_w = os.pipe()
    try:
        child = subprocess.Popen(
            command,
            process_group=0,
            close_fds=True,
            env=env,
            preexec_fn=_become_task(applied),
            stdin=subprocess.DEVNULL,
            stdout=output_w,
            stderr=output_w,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        os.close(output_r)
        os.close(output_w)
        why = getattr(exc, "strerror", None) or str(exc)
        print(f"gpuprovider: cannot start {command[0]!r}: {why}", file=sys.stderr)
        if applied is not None:
            undo(applied)
        _write_json(
            exit_path,
            {
                "exit_code": 127,
                "error": f"cannot start {command[0]!r}: {why}",
                "finished_at": time.time(),
            },
        )
        return 0
    _write_json(
        os.path.join(run_dir, f"runner-{attempt}.json"),
        {
            "pid": os.getpid(),
            "child_pid": child.pid,
            "started_at": started,
            "proc_start": process_start_time(os.getpid()),
        },
    )
    os.close(output_w)  # the task's processes hold the only writing ends
    os.set_blocking(output_r, False)
    # Wait on the child's pidfd (readable when it exits), its output and signals.
    selector = selectors.DefaultSelector()
    selector.register(wake_r, selectors.EVENT_READ)
    selector.register(output_r, selectors.EVENT_READ)
    try:
        pidfd = os.pidfd_open(child.pid)
        selector.register(pidfd, selectors.EVENT_READ)
    except (AttributeError, OSError):  # kernel < 5.3: poll instead
        pidfd = None
    signalled = False
    fenced = ""
    while (code := child.poll()) is None:
        now = time.time()
        if max_duration_s and not stop["reason"] and now - started > max_duration_s:
            stop["reason"] = "max_duration"
        if fence is not None and not fenced and (fenced := fence.why_not(now)):
            _signal_all(child.pid, signal.SIGKILL, applied)
            stop["reason"], stop["deadline"], signalled = "fenced", now + 1.0, True
        if stop["reason"] and not signalled:
            _signal_all(child.pid, signal.SIGTERM, applied)
            stop["deadline"] = now + grace_s
            signalled = True
        elif signalled and now > stop["deadline"]:
            _signal_all(child.pid, signal.SIGKILL, applied)
            stop["deadline"] = now + 1.0
        timeout = 1.0 if pidfd is not None else 0.05
        if signalled:
            timeout = min(timeout, max(stop["deadline"] - now, 0.0))
        elif max_duration_s:
            timeout = min(timeout, max(started + max_duration_s - now, 0.0) + 0.001)
        if fence is not None:
            timeout = min(timeout, Fence.CHECK_S)
        for key, _ in selector.select(timeout):
            if key.fd == output_r and not _copy(output_r, log):
                selector.unregister(output_r)  # every writer is gone
        with contextlib.suppress(BlockingIOError):
            while wake_r.recv(512):
                pass
    # Whatever the command left behind goes with it: its group, its cgroup, its user's
    # processes; then its cgroup and user are given back.
    _signal_all(child.pid, signal.SIGKILL, applied)
    ended: dict[str, object] = {
        "exit_code": code,
        "stopped": stop["reason"] == "stopped",
        "timed_out": stop["reason"] == "max_duration",
    }
    if fenced:
        ended["fenced"] = fenced
    gone = False
    if applied is not None:
        if applied.cgroups and cgroups.out_of_memory(applied.cgroups):
            ended["oom"] = True
            ended["memory_limit_bytes"] = applied.memory_limit_bytes
        gone = undo(applied, give_user_back=False)
        if not gone:
            ended["leftovers"] = "processes of the attempt outlived it; its user is kept back"
    _copy(output_r, log)  # what they wrote before they went
    os.close(output_r)
    log.close()
    _write_json(exit_path, {**ended, "finished_at": time.time()})
    # Nothing of it runs: its GPU may go to the next task now, while its user's network
    # rules are lifted and the user given back. (A runner killed right here leaves the
    # user lent and its ports guarded: the safe side.)
    if applied is not None and gone:
        give_user_back(applied)
    return 0


def _copy(source: int, log: CappedLog) -> bool:
    """Copy what the task wrote into its log; False once no one can write any more."""
    while True:
        try:
            data = os.read(source, 1 << 16)
        except BlockingIOError:
            return True
        if not data:
            return False
        log.write(data)


# -- the runner server -------------------------------------------------------------


def _become_runner(request: dict, inherited: list[int]) -> None:
    """In a forked child of the server: detach, take the task's log as output, run."""
    for fd in inherited:  # the server's sockets and descriptors are not the runner's
        with contextlib.suppress(OSError):
            os.close(fd)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    code = 1
    try:
        with contextlib.suppress(PermissionError):  # started on its own: already a leader
            os.setsid()
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        os.chdir(request["workdir"])
        applied = Applied(**request["isolation"]) if request.get("isolation") else None
        code = run(
            request["argv"],
            request["run_dir"],
            int(request["attempt"]),
            float(request["grace_s"]),
            float(request["max_duration_s"]),
            request["env"],
            applied,
            int(request.get("log_max_bytes", 64 << 20)),
            str(request.get("lease_file", "")),
        )
    except BaseException as exc:  # never return into the server's loop
        with contextlib.suppress(Exception):
            print(f"gpuprovider runner: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    finally:
        os._exit(code)


def _wait_for_task(job_fd: int, inherited: list[int]) -> None:
    """In a spare forked ahead of need: wait for the task the server hands over (all of
    it, until the server closes the pipe), then run it; no task: exit."""
    for fd in inherited:
        with contextlib.suppress(OSError):
            os.close(fd)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    chunks = []
    while chunk := os.read(job_fd, 1 << 16):
        chunks.append(chunk)
    os.close(job_fd)
    if not chunks:
        os._exit(0)
    try:
        request = json.loads(b"".join(chunks))
    except ValueError:
        os._exit(1)
    _become_runner(request, [])


def bind_path(directory_fd: int, name: str) -> str:
    """A short path to `name` in a directory, whatever the directory's own path length
    (a Unix socket path is limited to 107 bytes)."""
    return f"/proc/self/fd/{directory_fd}/{name}"


def serve(directory: str, name: str) -> None:
    """Fork runners on request until idle; tell watchers when a runner ends.

    Requests and answers are JSON lines on a Unix socket of mode 0600 in the
    provider's own directory: only the provider's user can ask for a runner.
    """
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    # One server per socket: a second one started in a race leaves the first be.
    lock_fd = os.open(bind_path(dir_fd, name + ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return
    path = bind_path(dir_fd, name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    listener.listen(64)
    listener.setblocking(False)
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the selector
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stopped only by SIGKILL or idleness
    if os.geteuid() == 0:
        network.load()  # once here, not in every runner that lifts a task's rules
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(wake_r, selectors.EVENT_READ, "signal")
    clients: dict[socket.socket, bytearray] = {}
    watchers: set[socket.socket] = set()
    runners: set[int] = set()
    # Runners forked ahead of need: pid -> the pipe their task will come through. A start
    # hands a task to one at once; the fork that replaces it happens after the answer.
    spares: dict[int, int] = {}
    idle_since = time.monotonic()
    retiring = False  # the daemon stopped cleanly: exit once no runner and no client is left

    def inherited() -> list[int]:
        """What a forked child must close: the server's descriptors, not its own."""
        sockets = [listener, wake_r, wake_w, *clients]
        own = [selector.fileno(), dir_fd, lock_fd, *spares.values()]
        return [s.fileno() for s in sockets] + own

    def fork_spare() -> None:
        job_r, job_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(job_w)
            _wait_for_task(job_r, inherited())
        os.close(job_r)
        spares[pid] = job_w

    def drop(conn: socket.socket) -> None:
        selector.unregister(conn)
        clients.pop(conn, None)
        watchers.discard(conn)
        conn.close()

    def reap() -> None:
        ended = []
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in spares:  # a spare that died before it got a task
                os.close(spares.pop(pid))
            elif pid in runners:
                runners.discard(pid)
                ended.append(pid)
        for pid in ended:
            line = json.dumps({"exited": pid}).encode() + b"\n"
            for watcher in list(watchers):
                try:
                    watcher.sendall(line)
                except OSError:
                    drop(watcher)

    def start(request: dict) -> int:
        if spares:
            pid, job_w = spares.popitem()
            payload = json.dumps(request).encode()
            try:
                while payload:
                    payload = payload[os.write(job_w, payload) :]
            finally:
                os.close(job_w)
        else:
            pid = os.fork()
            if pid == 0:
                _become_runner(request, inherited())
        runners.add(pid)
        return pid

    def handle(conn: socket.socket, request: dict) -> dict | None:
        nonlocal retiring
        op = request.get("op")
        if op == "retire":
            retiring = True
            return {"retiring": True, "runners": len(runners)}
        if op == "hello":
            return {"version": VERSION, "pid": os.getpid()}
        if op == "watch":
            watchers.add(conn)
            return {"watching": True}
        if op == "start":
            retiring = False
            return {"pid": start(request)}
        return {"error": f"unknown op {op!r}"}

    while True:
        if runners or clients:
            idle_since = time.monotonic()
        elif retiring or time.monotonic() - idle_since > IDLE_EXIT_S or not os.path.exists(path):
            break  # its daemon stopped, idle, or its home was deleted: no one needs it
        while len(spares) < SPARES:
            fork_spare()
        for key, _ in selector.select(timeout=5.0):
            if key.data == "accept":
                with contextlib.suppress(BlockingIOError):
                    conn, _ = listener.accept()
                    conn.setblocking(True)
                    clients[conn] = bytearray()
                    selector.register(conn, selectors.EVENT_READ, "client")
            elif key.data == "signal":
                with contextlib.suppress(BlockingIOError):
                    while wake_r.recv(512):
                        pass
                reap()
            else:
                conn = cast(socket.socket, key.fileobj)  # "client": an accepted socket
                try:
                    data = conn.recv(1 << 16)
                except OSError:
                    data = b""
                if not data:
                    drop(conn)
                    continue
                buffer = clients[conn]
                buffer += data
                while b"\n" in buffer:
                    line, _, rest = bytes(buffer).partition(b"\n")
                    buffer[:] = rest
                    try:
                        reply = handle(conn, json.loads(line))
                    except (ValueError, KeyError, TypeError, OSError) as exc:
                        reply = {"error": f"{type(exc).__name__}: {exc}"}
                    try:
                        conn.sendall(json.dumps(reply).encode() + b"\n")
                    except OSError:
                        drop(conn)
                        break
        reap()  # a SIGCHLD may have come between the select and its handler
    for job_w in spares.values():  # no task comes: they exit
        os.close(job_w)
    with contextlib.suppress(OSError):
        os.unlink(path)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpuprovider-runner")
    parser.add_argument("--serve", metavar="NAME", help="run the runner server as NAME")
    parser.add_argument("--dir", help="the server's directory (with --serve)")
    parser.add_argument(
        "--request", metavar="FILE", help="run one attempt, as FILE (JSON) says (no server)"
    )
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.dir, args.serve)
        return 0
    with open(args.request) as handle:
        request = json.load(handle)
    _become_runner(request, [])
    return 1  # not reached: a runner ends the process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
