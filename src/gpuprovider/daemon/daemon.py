"""`gpuprovider up`: the API on an asyncio event loop, and the loops, each on a thread
of its own, woken by the signals the store publishes."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import signal
import socket
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import IO

import uvicorn
import uvloop

from gpuprovider.api.app import build_asgi
from gpuprovider.api.deps import Services
from gpuprovider.backends.base import Backend
from gpuprovider.backends.container import container_engine
from gpuprovider.backends.local import LocalBackend, LocalNode
from gpuprovider.backends.ray.driver import RayBackend
from gpuprovider.check import CheckContext, Status, run_checks, select, summary
from gpuprovider.config import ProviderConfig
from gpuprovider.daemon.executor import ExecutorLoop
from gpuprovider.daemon.gateway import (
    ServiceLoop,
    ensure_gateway_token,
    start_gateway,
    stop_gateway,
)
from gpuprovider.daemon.inventory import InventoryLoop
from gpuprovider.daemon.loops import Loop, ReaperLoop
from gpuprovider.daemon.market import MarketBeat, MarketKeeper, MarketReader
from gpuprovider.daemon.scheduling import SchedulerLoop
from gpuprovider.daemon.telemetry import TelemetryLoop
from gpuprovider.domain.usability import Usability
from gpuprovider.home import Home
from gpuprovider.identity.keys import load_node_key, node_id_for, public_key_hex
from gpuprovider.market.connector import HubConnector, PushConnector
from gpuprovider.market.pricing import Pricing
from gpuprovider.scheduler import Framework, policy
from gpuprovider.service.calls import Calls
from gpuprovider.service.market import MarketService, MarketSettings
from gpuprovider.service.metrics import Metrics
from gpuprovider.service.nodes import NodeService
from gpuprovider.service.proofs import ProofService
from gpuprovider.service.repair import RepairService, RepairSettings
from gpuprovider.service.serving import GatewaySettings, Serving
from gpuprovider.service.swan import SwanService, SwanSettings
from gpuprovider.service.tasks import TaskService
from gpuprovider.service.tokens import TokenService
from gpuprovider.store.signals import Signal, Signals
from gpuprovider.store.store import Store, StoreError
from gpuprovider.telemetry.rules import parse_duration

log = logging.getLogger("gpuprovider")


class DaemonError(RuntimeError):
    """The daemon cannot start; the message says what to fix."""


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon stops it, then itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


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
        self.signals = Signals()
        self.store = Store(home.store_url(config.store.url), self.signals)
        try:
            upgraded = self.store.upgrade_in_child()
        except StoreError as exc:
            raise DaemonError(str(exc)) from None
        if upgraded.changed and upgraded.before is not None:
            log.info("store upgraded from schema %s to %s", upgraded.before, upgraded.after)
        key = load_node_key(home.node_key)
        self.node_id, public_key = node_id_for(key), public_key_hex(key)
        trusted = frozenset(config.proof.trusted_verifiers) | {
            m.verifier_key.lower() for m in config.market.values() if m.verifier_key
        }
        usability = Usability(config.proof.max_age_s if config.proof.required else None, trusted)
        engine = partial(container_engine, config.executor.container_engine)
        self.backend = self._backend(public_key)
        framework_policy = policy(config.scheduler.policy)
        self.alerter = config.alerts.alerter()
        self.repair = RepairService(
            self.store,
            RepairSettings(
                rules=config.repair.active_rules(),
                dry_run=config.repair.dry_run,
                breaker_max_pct=config.repair.breaker_max_pct,
                breaker_window_s=parse_duration(config.repair.breaker_window),
                reset_command=list(config.repair.reset_command),
                local_node_id=self.node_id,
            ),
            self.alerter,
        )
        self.metrics = Metrics(self.store, usability, self.repair)
        gateway = config.gateway
        self.serving = Serving(
            self.store,
            GatewaySettings(gateway.host, gateway.port, gateway.domain, bool(gateway.tls_cert)),
        )
        self.scheduler = SchedulerLoop(
            self.store, Framework(framework_policy), config, usability, self.metrics
        )
        self.executor = ExecutorLoop(self.store, self.backend, config, self.tasks_dir, engine)
        self.inventory = InventoryLoop(self.store, self.backend, config.inventory.interval_s)
        self.reaper = ReaperLoop(self.store, config)
        self.telemetry = TelemetryLoop(
            self.backend, self.repair, config.telemetry.interval_s, config.telemetry.kernel_log
        )
        self.loops: list[Loop] = [
            self.inventory,
            self.scheduler,
            self.executor,
            self.reaper,
            self.telemetry,
            ServiceLoop(self.serving),
        ]
        for fired, listener in (
            (Signal.QUEUED, self.scheduler.submitted),
            (Signal.CAPACITY, self.scheduler.capacity_changed),
            (Signal.NODES, self.scheduler.nodes_changed),
            (Signal.PLACED, self.executor.placed),
            (Signal.STOP, self.executor.resync),
            (Signal.EXITED, self.executor.wake),
        ):
            self.signals.subscribe(fired, listener)
        tasks = TaskService(
            self.store,
            framework_policy,
            usability,
            self.backend,
            engine,
            self.serving,
            workdir_roots=config.isolation.workdir_roots,
        )
        tokens = TokenService(self.store)
        markets = [
            MarketService(
                self.store,
                tasks,
                tokens,
                key,
                Pricing(config.pricing),
                MarketSettings(
                    name=name,
                    url=m.url,
                    api_url=m.api_url or f"http://{config.api.host}:{config.api.port}",
                    provider_name=m.provider_name
                    or re.sub(
                        r"[^A-Za-z0-9_.-]", "-", config.inventory.node_name or socket.gethostname()
                    )[:64],
                    priority=m.priority,
                    heartbeat_s=m.heartbeat_s,
                    usage_interval_s=m.usage_interval_s,
                    bid_valid_s=m.bid_valid_s,
                ),
                PushConnector() if m.kind == "swan" else HubConnector(m.url, key),
            )
            for name, m in config.market.items()
        ]
        swan = None
        for market, m in zip(markets, config.market.values(), strict=True):
            self.loops.append(MarketKeeper(market))
            if m.kind == "hub":
                self.loops += [MarketReader(market), MarketBeat(market)]
                continue
            market.register()  # a push market: nothing to reach, only routes to serve
            swan = SwanService(
                market,
                SwanSettings(
                    orchestrator=m.orchestrator.lower(),
                    cp_account=m.cp_account,
                    node_id=m.node_id,
                    token_price=m.token_price,
                    source_hosts=frozenset(h.lower() for h in m.source_hosts),
                ),
            )
        self.services = Services(
            tasks=tasks,
            nodes=NodeService(self.store, usability),
            repair=self.repair,
            metrics=self.metrics,
            serving=self.serving,
            tokens=tokens,
            markets=markets,
            swan=swan,
            proofs=ProofService(
                self.store,
                key,
                self.node_id,
                public_key,
                config.proof.simulated_memory_mib,
                trusted,
                usability.proving,
                config.proof.session_s,
            ),
            calls=Calls(self.store),
        )

    @property
    def tasks_dir(self) -> Path:
        """Where tasks' folders are (their logs, exit records, work folders): in the home,
        or on a Ray node, `[backend] node_dir` of each node if set."""
        backend = self.config.backend
        return (
            Path(backend.node_dir)
            if backend.kind == "ray" and backend.node_dir
            else self.home.tasks
        )

    def _backend(self, public_key: str) -> Backend:
        config = self.config
        if config.backend.kind == "ray":
            return RayBackend(
                config.backend.address,
                self.tasks_dir,
                self.home.root / "ray.credential",
                config.isolation.settings(),
                config.backend.lease_s,
                config.backend.lease_grace_s,
                config.telemetry.kernel_log,
            )
        node = LocalNode(
            node_id=self.node_id,
            name=config.inventory.node_name,
            public_key=public_key,
            home=self.home.root,
            simulated_gpus=tuple(config.inventory.simulated_gpus),
            labels=tuple(sorted(config.inventory.labels.items())),
            nvml=config.inventory.nvml,
        )
        backend = LocalBackend(
            node,
            self.home.tasks,
            on_exit=partial(self.signals.fire, Signal.EXITED),
            isolation=config.isolation.settings(),
        )
        for what, how in backend.isolation.describe().items():
            if how.startswith("none"):
                log.warning("ISOLATION %s %s: tasks are not kept apart this way", what, how)
        return backend

    def preflight(self) -> None:
        """The preflight checks, logged and stored; their trouble never stops the daemon."""
        try:
            run = run_checks(
                CheckContext(self.config, self.home.root, self.node_id), select(["preflight"])
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
            with self.store.tx() as tx:
                tx.checks.save(self.node_id, run.results, run.started_at)
        except Exception:
            log.exception("preflight checks failed; starting anyway")

    async def serve(self) -> None:
        lock = lock_home(self.home)
        self.inventory.tick()  # register the nodes (and connect a cluster) first
        self.preflight()  # before binding: the API port must still be free
        sock = bind_api_socket(self.config.api.host, self.config.api.port)
        try:
            app = build_asgi(self.services, self.config.api.max_body_bytes)
            server = _Server(
                uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
            )
            self.alerter.start()
            for loop in self.loops:
                loop.start()
            if self.config.gateway.enabled:
                ensure_gateway_token(self.home, self.services.tokens, self.node_id)
                start_gateway(self.home)
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
            for loop in self.loops:
                await asyncio.to_thread(loop.stop)
            await asyncio.to_thread(self.alerter.stop)
            if self.config.gateway.enabled:
                await asyncio.to_thread(stop_gateway, self.home)
            log.info("gpuprovider stopped; running tasks keep running and are re-adopted on start")
        finally:
            sock.close()
            self.backend.close()
            self.store.close()
            lock.close()


def run_daemon(home: Home, config: ProviderConfig) -> None:
    uvloop.run(Daemon(home, config).serve())
