"""The task runner: a small process between the provider and a task's command.

It starts the command in its own process group, enforces the maximum duration,
turns SIGTERM into "stop the command: SIGTERM, then SIGKILL after the grace
period", and writes how the command ended to `exit-<attempt>.json`. Because it
outlives the daemon, a task that finishes while the daemon is down still has
its real exit code on record.

Standard library only and run by path (`python -I runner.py`), so it starts
fast and is the same code on every backend.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(data, handle)
    os.replace(tmp, path)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpuprovider-runner")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--attempt", type=int, required=True)
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("--max-duration", type=float, default=0.0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    exit_path = os.path.join(args.run_dir, f"exit-{args.attempt}.json")
    started = time.time()
    stop = {"reason": "", "deadline": None}

    def request_stop(signum: int, _frame: object) -> None:
        if not stop["reason"]:
            stop["reason"] = "stopped"

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        child = subprocess.Popen(command, process_group=0, close_fds=True)
    except OSError as exc:
        print(f"gpuprovider: cannot start {command[0]!r}: {exc.strerror}", file=sys.stderr)
        _write_json(
            exit_path,
            {
                "exit_code": 127,
                "error": f"cannot start {command[0]!r}: {exc.strerror}",
                "finished_at": time.time(),
            },
        )
        return 0
    _write_json(
        os.path.join(args.run_dir, f"runner-{args.attempt}.json"),
        {"pid": os.getpid(), "child_pid": child.pid, "started_at": started},
    )
    signalled = False
    while True:
        try:
            code = child.wait(timeout=0.05)
            break
        except subprocess.TimeoutExpired:
            pass
        now = time.time()
        if args.max_duration and not stop["reason"] and now - started > args.max_duration:
            stop["reason"] = "max_duration"
        if stop["reason"] and not signalled:
            _signal_group(child.pid, signal.SIGTERM)
            stop["deadline"] = now + args.grace
            signalled = True
        elif signalled and now > stop["deadline"]:
            _signal_group(child.pid, signal.SIGKILL)
    # Whatever the command left behind in its group goes with it.
    _signal_group(child.pid, signal.SIGKILL)
    _write_json(
        exit_path,
        {
            "exit_code": code,
            "stopped": stop["reason"] == "stopped",
            "timed_out": stop["reason"] == "max_duration",
            "finished_at": time.time(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
