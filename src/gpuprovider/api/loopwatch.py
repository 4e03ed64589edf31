"""Watching the event loop that serves the API: a callback that uses more than a limit
of CPU, or makes a call that waits (a subprocess, a sleep, a socket connect), is logged
as an error naming it. Nothing that can wait may run there (`service/calls.py` says
where each call runs); the tests run their daemons with the watch on and hold the log
to it.

On when GPUPROVIDER_LOOP_WATCH_MS is set (the CPU limit). It patches the standard
asyncio loop's callback runner (the daemon then runs on it instead of uvloop) and adds
an audit hook: for tests and diagnosis, not for production.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
import traceback
from typing import Any

log = logging.getLogger("gpuprovider.loopwatch")
ENV = "GPUPROVIDER_LOOP_WATCH_MS"
MARK = "EVENT LOOP BLOCKED"
# Audit events of calls that wait: never on the loop.
WAITING = frozenset(
    {
        "subprocess.Popen",
        "os.system",
        "os.posix_spawn",
        "os.fork",
        "time.sleep",
        "socket.connect",
        "socket.getaddrinfo",
    }
)


class _State(threading.local):
    callback: Any = None  # the callback running on this thread's loop, if any


_state = _State()
_limit_s = 0.0
# The loop's thread, its running callback and when it began: the watchdog takes the
# stack of one that runs long, so that the log can say where it spent its time.
_running: dict[int, tuple[Any, float]] = {}
_stacks: dict[int, str] = {}  # id of a long callback -> where the watchdog found it


def _ours(frames: list[traceback.FrameSummary]) -> str:
    return " < ".join(
        f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno} {frame.name}"
        for frame in reversed(frames)
        if "loopwatch" not in frame.filename
    )[:1500]


def _watchdog() -> None:
    while True:
        time.sleep(0.005)
        now = time.monotonic()
        for thread_id, (callback, began) in list(_running.items()):
            if now - began > _limit_s / 2 and id(callback) not in _stacks:
                frame = sys._current_frames().get(thread_id)
                if frame is not None:
                    _stacks[id(callback)] = _ours(traceback.extract_stack(frame, limit=25))


def limit_ms() -> float | None:
    value = os.environ.get(ENV, "")
    try:
        return float(value) if value else None
    except ValueError:
        return None


def install(limit: float) -> None:
    """Watch every asyncio loop of this process from now on."""
    global _limit_s
    _limit_s = limit / 1000
    handle = asyncio.events.Handle
    if getattr(handle._run, "_watched", False):
        return
    plain_run = handle._run

    def watched_run(self: asyncio.events.Handle) -> None:
        _state.callback = self
        me = threading.get_ident()
        _running[me] = (self, time.monotonic())
        started = time.thread_time()
        try:
            plain_run(self)
        finally:
            _state.callback = None
            _running.pop(me, None)
            used = time.thread_time() - started
            where = _stacks.pop(id(self), "")
            if used > _limit_s:
                log.error(
                    "%s: %.0f ms of CPU in %s, at %s", MARK, used * 1000, _describe(self), where
                )

    watched_run._watched = True  # type: ignore[attr-defined]
    handle._run = watched_run  # type: ignore[method-assign]
    sys.addaudithook(_audit)
    threading.Thread(target=_watchdog, name="loop-watchdog", daemon=True).start()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    callback = _state.callback
    if callback is not None and event in WAITING:
        _state.callback = None  # one line per callback, and none for the logging itself
        where = _ours(traceback.extract_stack(limit=25))
        log.error("%s: %s in %s, at %s", MARK, event, _describe(callback), where)


def _describe(callback: Any) -> str:
    return repr(callback)[:300]
