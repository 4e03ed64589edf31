"""The gateway beside the daemon: its token made once, its process started by `up` (or
a running one from before a daemon restart adopted: it kept serving meanwhile), and
stopped when the daemon stops. The service loop keeps replica sets at their size."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from gpuprovider.daemon.loops import Loop
from gpuprovider.home import Home, write_secret
from gpuprovider.service.serving import Serving
from gpuprovider.service.tokens import TokenService

log = logging.getLogger(__name__)


class ServiceLoop(Loop):
    def __init__(self, serving: Serving):
        super().__init__("services", 1.0)
        self.serving = serving

    def tick(self) -> float | None:
        self.serving.reconcile()
        return None


def ensure_gateway_token(home: Home, tokens: TokenService, node_id: str) -> None:
    if home.gateway_token.exists():
        return
    made = tokens.create(f"gateway-{node_id[2:10]}", ["gateway"], "gateway")
    write_secret(home.gateway_token, made["token"].encode())


def _running_gateway(home: Home) -> psutil.Process | None:
    with contextlib.suppress(OSError, ValueError, psutil.Error):
        pid = int(home.gateway_pid.read_text())
        proc = psutil.Process(pid)
        cmdline = proc.cmdline()
        if "gateway" in cmdline and str(home.root) in cmdline:
            return proc
    return None


def start_gateway(home: Home) -> subprocess.Popen | None:
    """The gateway process for this home, started unless one still runs (then None)."""
    if (running := _running_gateway(home)) is not None:
        log.info("gateway pid %d still serves; adopted", running.pid)
        return None
    log_file = open(home.root / "gateway.log", "ab")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpuprovider", "--home", str(home.root), "gateway"],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # outlives a daemon crash, as runners do
    )
    log_file.close()
    tmp = Path(f"{home.gateway_pid}.tmp")
    tmp.write_text(str(proc.pid))
    os.replace(tmp, home.gateway_pid)
    return proc


def stop_gateway(home: Home) -> None:
    proc = _running_gateway(home)
    if proc is None:
        return
    with contextlib.suppress(psutil.Error):
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    with contextlib.suppress(psutil.Error):
        proc.kill()
    home.gateway_pid.unlink(missing_ok=True)
