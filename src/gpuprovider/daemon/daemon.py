"""`gpuprovider up`: one asyncio process, the API plus the loops."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import uvicorn
import uvloop

from gpuprovider.api.app import ApiContext, build_asgi
from gpuprovider.backends.local import LocalBackend
from gpuprovider.backends.ray import RayBackend, RayBackendError
from gpuprovider.check import CheckContext, Status, run_checks, select, summary
from gpuprovider.config import ProviderConfig
from gpuprovider.daemon.executor import ExecutorLoop
from gpuprovider.daemon.loops import Loop, ReaperLoop
from gpuprovider.daemon.scheduling import SchedulerLoop
from gpuprovider.home import Home
from gpuprovider.identity.keys import load_node_key, node_id_for, public_key_hex
from gpuprovider.inventory.local import read_local_node
from gpuprovider.scheduler import Framework, policy
from gpuprovider.service.proofs import ProofService
from gpuprovider.service.tasks import TaskService
from gpuprovider.store.store import Store

log = logging.getLogger("gpuprovider")
RAY_RETRY_S = 5.0
RAY_LIVENESS_S = 1.0


class DaemonError(RuntimeError):
    """The daemon cannot start; the message says what to fix."""


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon stops it, then itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class InventoryLoop(Loop):
    """Registers this machine as a node and refreshes it (heartbeat, GPUs)."""

    def __init__(
        self, store: Store, home: Home, config: ProviderConfig, on_change: Callable[[], None]
    ):
        super().__init__("inventory", config.inventory.interval_s)
        self.key = load_node_key(home.node_key)
        self.node_id = node_id_for(self.key)
        self.public_key = public_key_hex(self.key)
        self.store, self.home, self.config = store, home, config
        self.on_change = on_change

    def tick(self) -> float | None:
        node = read_local_node(
            self.node_id,
            self.config.inventory.node_name,
            self.public_key,
            self.home.root,
            self.config.inventory.simulated_gpus,
            self.config.inventory.labels,
        )
        self.store.upsert_node(node)
        self.on_change()
        return None


class RayInventoryLoop(Loop):
    """The nodes of the Ray cluster that joined as gpuprovider nodes: liveness every
    second (dead ones marked unreachable at once, so nothing new lands there), and each
    node's hardware, as the node reports it, every `interval_s`. Ray trouble is logged
    and retried; the daemon keeps serving the API meanwhile."""

    def __init__(self, store: Store, backend: RayBackend, interval_s: float, on_change):
        super().__init__("inventory", interval_s)
        self.store, self.backend, self.on_change = store, backend, on_change
        self.problem = ""
        self._inventory_due = 0.0
        self.unreachable: set[str] = set()  # dead nodes already marked in the store

    def tick(self) -> float | None:
        now = time.monotonic()
        try:
            if now >= self._inventory_due:
                self._inventory_due = now + self.interval_s
                nodes, dead = self.backend.discover()
            else:
                nodes, dead = [], self.backend.dead_nodes()
        except RayBackendError as exc:
            if str(exc) != self.problem:
                log.error("%s", exc)
            self.problem = str(exc)
            self._inventory_due = 0.0
            return RAY_RETRY_S
        self.problem = ""
        changed = False
        if nodes:
            status = {n.id: n.status for n in self.store.nodes()}
            for node in nodes:
                self.store.upsert_node(node)
                if status.get(node.id, "unreachable") == "unreachable":  # new, or back
                    self.store.set_node_status(node.id, "ready", "")
                    changed = True
                self.unreachable.discard(node.id)
        for node_id, why in dead.items():
            if node_id not in self.unreachable:
                self.unreachable.add(node_id)
                changed |= self.store.set_node_status(node_id, "unreachable", why)
        if changed:
            self.on_change()
        return RAY_LIVENESS_S


def lock_home(home: Home) -> IO:
    """One daemon per home: a second one would start every task twice."""
    handle = open(home.lock, "a+")  # noqa: SIM115 - held open for the daemon's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise DaemonError(
            f"another gpuprovider daemon (pid {holder}) is running on {home.root}; stop it first"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def bind_api_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise DaemonError(
            f"cannot listen on {host}:{port}: {exc.strerror}; is another gpuprovider running? "
            "change [api] port in provider.toml"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Daemon:
    def __init__(self, home: Home, config: ProviderConfig):
        if not home.config.exists():
            raise DaemonError(f"{home.root} is not initialised; run `gpuprovider init` first")
        self.home, self.config = home, config
        self.store = Store(home.store_url(config.store.url))
        try:
            self.store.check_schema()
        except Exception as exc:
            raise DaemonError(str(exc)) from None
        framework = Framework(policy(config.scheduler.policy))
        if config.backend.kind == "ray":
            self.backend = RayBackend(config.backend.address, home.tasks)
        else:
            self.backend = LocalBackend()
        self.scheduler = SchedulerLoop(self.store, framework, config, on_placed=self._wake_executor)
        self.executor = ExecutorLoop(
            self.store,
            self.backend,
            config,
            Path(home.tasks),
            on_freed=self.scheduler.capacity_changed,
        )
        self.inventory = InventoryLoop(
            self.store, home, config, on_change=self.scheduler.capacity_changed
        )
        self.nodes_loop: Loop = self.inventory
        if isinstance(self.backend, RayBackend):
            self.nodes_loop = RayInventoryLoop(
                self.store,
                self.backend,
                config.inventory.interval_s,
                on_change=self.scheduler.capacity_changed,
            )
        self.reaper = ReaperLoop(self.store, config)
        self.tasks = TaskService(
            self.store,
            framework,
            on_submitted=self.scheduler.submitted,
            on_cancel_requested=self._wake_executor,
            on_capacity_freed=self.scheduler.capacity_changed,
            proof_max_age_s=self.scheduler.proof_max_age_s,
        )
        self.proofs = ProofService(
            self.store,
            self.inventory.key,
            self.inventory.node_id,
            self.inventory.public_key,
            config.proof.simulated_memory_mib,
            on_gpus_changed=self.scheduler.capacity_changed,
        )
        self.stopping = asyncio.Event()

    def preflight(self) -> None:
        """The preflight checks, logged and stored; their trouble never stops the daemon."""
        try:
            node_id = self.inventory.node_id
            run = run_checks(
                CheckContext(self.config, self.home.root, node_id), select(["preflight"])
            )
            counts = summary(run.results)
            log.info(
                "preflight: %d pass, %d warn, %d fail, %d skipped "
                "(`gpuprovider check` for the full suite)",
                counts["PASS"],
                counts["WARN"],
                counts["FAIL"],
                counts["SKIP"],
            )
            for r in run.results:
                if r.status in (Status.WARN, Status.FAIL):
                    log.warning(
                        "preflight %s %s: %s; %s", r.name, r.status, r.shown_value, r.advice
                    )
            self.store.save_check_results(node_id, run.results, run.started_at)
        except Exception:
            log.exception("preflight checks failed; starting anyway")

    def _wake_executor(self) -> None:
        self.executor.wake()

    async def serve(self) -> None:
        lock = lock_home(self.home)
        self.preflight()  # before binding: the API port must still be free
        sock = bind_api_socket(self.config.api.host, self.config.api.port)
        try:
            self.nodes_loop.tick()  # register the nodes before anything is placed
            app = build_asgi(
                ApiContext(
                    self.store,
                    self.tasks,
                    self.config.api.max_body_bytes,
                    self.backend,
                    on_nodes_changed=self.scheduler.capacity_changed,
                    proofs=self.proofs,
                )
            )
            server = _Server(
                uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
            )
            loops = [
                asyncio.create_task(loop.run(self.stopping), name=loop.name)
                for loop in (self.nodes_loop, self.scheduler, self.executor, self.reaper)
            ]
            log.info(
                "gpuprovider listening on http://%s:%d (home %s)",
                self.config.api.host,
                self.config.api.port,
                self.home.root,
            )
            event_loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                event_loop.add_signal_handler(sig, setattr, server, "should_exit", True)
            await server.serve(sockets=[sock])  # returns once should_exit is set
            self.stopping.set()
            for loop in (self.nodes_loop, self.scheduler, self.executor, self.reaper):
                loop.wake()
            await asyncio.gather(*loops)
            log.info("gpuprovider stopped; running tasks keep running and are re-adopted on start")
        finally:
            sock.close()
            self.store.close()
            lock.close()


def run_daemon(home: Home, config: ProviderConfig) -> None:
    uvloop.run(Daemon(home, config).serve())
