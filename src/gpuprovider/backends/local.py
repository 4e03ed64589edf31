"""Local backend: each task a process on this machine, under the task runner."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from gpuprovider.backends import runner
from gpuprovider.backends.base import Exit, Handle, Launch

RUNNER_PATH = runner.__file__
# Process start times read twice may differ by clock-tick rounding.
START_TIME_TOLERANCE_S = 0.05


def read_exit(run_dir: str, attempt: int) -> Exit | None:
    path = Path(run_dir) / f"exit-{attempt}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return Exit(None, f"lost: unreadable exit record {path}: {exc}", lost=True)
    code = data.get("exit_code")
    if data.get("error"):
        reason = data["error"]
    elif data.get("timed_out"):
        reason = "exceeded its max duration and was stopped"
    elif data.get("stopped"):
        reason = "stopped on request"
    elif code is not None and code < 0:
        reason = f"killed by signal {signal.Signals(-code).name}"
    else:
        reason = f"exited with code {code}"
    return Exit(
        exit_code=code,
        reason=reason,
        stopped=bool(data.get("stopped")),
        timed_out=bool(data.get("timed_out")),
        details=data,
    )


def process_alive(pid: int, start_time: float) -> bool:
    """True only for the very process recorded: a recycled pid does not count."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - start_time) > START_TIME_TOLERANCE_S:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


class LocalBackend:
    name = "local"

    def __init__(self) -> None:
        # Runners this daemon started; polled so they never linger as zombies.
        self._children: dict[int, subprocess.Popen] = {}

    def start(self, launch: Launch) -> Handle:
        Path(launch.run_dir).mkdir(parents=True, exist_ok=True)
        Path(launch.workdir).mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            "-I",
            RUNNER_PATH,
            "--run-dir",
            launch.run_dir,
            "--attempt",
            str(launch.attempt),
            "--grace",
            str(launch.grace_s),
            "--max-duration",
            str(launch.max_duration_s or 0),
            "--",
            *launch.argv,
        ]
        log_path = Path(launch.run_dir) / "output.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv,
                cwd=launch.workdir,
                env=launch.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        self._children[proc.pid] = proc
        try:
            start_time = psutil.Process(proc.pid).create_time()
        except psutil.NoSuchProcess:
            start_time = 0.0  # already gone: poll reads its exit record
        return Handle(proc.pid, start_time, launch.run_dir, launch.attempt, launch.node_id)

    def poll_many(self, handles: list[Handle]) -> list[Exit | None]:
        return [self.poll(handle) for handle in handles]

    def poll(self, handle: Handle) -> Exit | None:
        ended = read_exit(handle.run_dir, handle.attempt)
        if ended is not None:
            self._reap(handle.pid)
            return ended
        child = self._children.get(handle.pid)
        alive = child.poll() is None if child else process_alive(handle.pid, handle.start_time)
        if alive:
            return None
        # The runner may have written its record between the two reads.
        ended = read_exit(handle.run_dir, handle.attempt)
        self._reap(handle.pid)
        if ended is not None:
            return ended
        return Exit(None, "lost: its runner process vanished without an exit record", lost=True)

    def stop(self, handle: Handle) -> bool:
        # Until the runner has written its record it has no SIGTERM handler yet, and
        # a signal would kill it before it can stop the command cleanly: ask later.
        if not (Path(handle.run_dir) / f"runner-{handle.attempt}.json").exists():
            return False
        if process_alive(handle.pid, handle.start_time):
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, signal.SIGTERM)
        return True

    def kill(self, handle: Handle) -> None:
        record = Path(handle.run_dir) / f"runner-{handle.attempt}.json"
        try:
            child_pid = json.loads(record.read_text())["child_pid"]
            os.killpg(child_pid, signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass
        if process_alive(handle.pid, handle.start_time):
            os.kill(handle.pid, signal.SIGKILL)

    def read_log(self, node_id: str, run_dir: str, offset: int, limit: int) -> bytes:
        try:
            with open(Path(run_dir) / "output.log", "rb") as handle:
                handle.seek(offset)
                return handle.read(limit)
        except FileNotFoundError:
            return b""

    def recover(self, run_dir: str, attempt: int, node_id: str = "") -> Handle | None:
        record = Path(run_dir) / f"runner-{attempt}.json"
        try:
            started = json.loads(record.read_text())
            pid = started["pid"]
        except (OSError, ValueError, KeyError):
            return None
        if (Path(run_dir) / f"exit-{attempt}.json").exists():
            return Handle(pid, started.get("started_at", 0.0), run_dir, attempt, node_id)
        try:
            proc = psutil.Process(pid)
            cmdline = proc.cmdline()
            start_time = proc.create_time()
        except psutil.Error:
            return None
        # The pid must still be that runner, not a process that reused the number.
        if RUNNER_PATH not in cmdline or run_dir not in cmdline:
            return None
        return Handle(pid, start_time, run_dir, attempt, node_id)

    def _reap(self, pid: int) -> None:
        child = self._children.pop(pid, None)
        if child is not None:
            child.poll()
