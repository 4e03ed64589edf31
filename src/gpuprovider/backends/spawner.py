"""The daemon's side of the runner server (see runner.py): start runners through it,
starting the server when none answers, and learn at once when a runner ends."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gpuprovider.backends import runner

log = logging.getLogger(__name__)

RUNNER = [sys.executable, "-I", "-m", runner.__name__]  # how a runner (server) is started
CONNECT_TIMEOUT_S = 5.0  # for a server just started to answer
CALL_TIMEOUT_S = 10.0


class SpawnerError(OSError):
    """The runner server cannot be reached or started."""


class Spawner:
    """Starts runners through this machine's runner server for `directory` (which
    must be the provider's own: the server's socket lives there, mode 0600)."""

    def __init__(self, directory: Path, on_exit: Callable[[], None] | None = None):
        self.directory = directory
        self.name = f"runner-{runner.VERSION}.sock"
        self.on_exit = on_exit
        self._lock = threading.Lock()  # one start request at a time on the connection
        self._starting = threading.Lock()
        self._conn: socket.socket | None = None
        self._reader: object = None
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None

    # -- connection ------------------------------------------------------------------

    def _connect_once(self) -> socket.socket:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(CALL_TIMEOUT_S)
            try:
                sock.connect(runner.bind_path(fd, self.name))
            except OSError:
                sock.close()
                raise
            return sock
        finally:
            os.close(fd)

    def _connect(self) -> socket.socket:
        """A connection to the server, starting it if none answers."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._starting:  # this process starts one server at most at a time
            return self._connect_or_start()

    def _connect_or_start(self) -> socket.socket:
        try:
            return self._connect_once()
        except OSError:
            pass
        subprocess.Popen(
            [*RUNNER, "--serve", self.name, "--dir", str(self.directory)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            try:
                return self._connect_once()
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise SpawnerError(f"the runner server did not answer: {exc}") from None
                time.sleep(0.01)

    @staticmethod
    def _exchange(sock: socket.socket, reader: object, requests: list[dict]) -> list[dict]:
        """Send requests together; the server's answers, in order."""
        sock.sendall(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
        answers = []
        for _ in requests:
            line = reader.readline()  # type: ignore[attr-defined]
            if not line:
                raise SpawnerError("the runner server closed the connection")
            answer = json.loads(line)
            if "error" in answer:
                raise SpawnerError(f"the runner server refused: {answer['error']}")
            answers.append(answer)
        return answers

    # -- starting runners ------------------------------------------------------------

    def start_many(self, requests: list[dict]) -> list[int]:
        """Fork a runner for each attempt (see runner._become_runner); their pids. The
        requests go out together and the server answers them back to back."""
        with self._lock:
            for retry in (True, False):
                try:
                    if self._conn is None:
                        self._conn = self._connect()
                        self._reader = self._conn.makefile("rb")
                    starts = [{"op": "start", **r} for r in requests]
                    answers = self._exchange(self._conn, self._reader, starts)
                    return [int(a["pid"]) for a in answers]
                except (OSError, ValueError) as exc:
                    self._drop()
                    if not retry:
                        raise SpawnerError(f"cannot start a runner: {exc}") from None
        raise AssertionError("unreachable")

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
        self._conn = self._reader = None

    # -- learning of exits -----------------------------------------------------------

    def watch(self) -> None:
        """Call `on_exit` whenever a runner of this server ends, from a thread of its own,
        reconnecting (and restarting the server) as needed."""
        if self.on_exit is None or self._watcher is not None:
            return
        self._watcher = threading.Thread(target=self._watch, name="runner-exits", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._closed.is_set():
            try:
                sock = self._connect()
                sock.settimeout(None)
                with sock, sock.makefile("rb") as reader:
                    self._exchange(sock, reader, [{"op": "watch"}])
                    for line in reader:
                        if b"exited" in line:
                            self.on_exit()  # type: ignore[misc]
            except (OSError, ValueError) as exc:
                if not self._closed.is_set():
                    log.warning("watching the runner server: %s; reconnecting", exc)
            self._closed.wait(1.0)

    def close(self) -> None:
        """Stop watching; ask the server to exit once it has no runner left (a task
        still running keeps it, and it keeps reporting that task's exit)."""
        self._closed.set()
        with self._lock:
            with contextlib.suppress(OSError, ValueError):
                if self._conn is None:  # the watcher started it; no task has run yet
                    self._conn = self._connect_once()
                    self._reader = self._conn.makefile("rb")
                self._exchange(self._conn, self._reader, [{"op": "retire"}])
            self._drop()
