"""`gpuprovider up`: the API on an asyncio event loop, and the loops, each on a thread
of its own, woken by the signals the store publishes."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
from collections.abc import Iterator
from functools import partial
from typing import IO

import uvicorn
import uvloop

from gpuprovider.api import loopwatch
from gpuprovider.api.app import build_asgi
from gpuprovider.api.deps import Services
from gpuprovider.backends.container import EngineProbe
from gpuprovider.backends.registry import BackendContext, make_backend, tasks_dir
from gpuprovider.check import CheckContext, Status, run_checks, select, summary
from gpuprovider.config import HubMarketConfig, ProviderConfig
from gpuprovider.daemon.executor import ExecutorLoop
from gpuprovider.daemon.gateway import (
    ServiceLoop,
    ensure_gateway_token,
    start_gateway,
    stop_gateway,
)
from gpuprovider.daemon.inventory import InventoryLoop
from gpuprovider.daemon.loops import Loop, ReaperLoop
from gpuprovider.daemon.market import MARKET_KINDS, MarketReporter, settings_for
from gpuprovider.daemon.scheduling import SchedulerLoop
from gpuprovider.daemon.telemetry import TelemetryLoop
from gpuprovider.domain.usability import Usability
from gpuprovider.home import Home, make_private
from gpuprovider.identity.keys import load_node_key, node_id_for, public_key_hex
from gpuprovider.market.pricing import Pricing
from gpuprovider.market.strategies import lease_strategy
from gpuprovider.rentals.broadcast import Broadcaster
from gpuprovider.scheduler import Framework, policy
from gpuprovider.service.calls import Calls
from gpuprovider.service.dashboard import Dashboard
from gpuprovider.service.files import FileLimits, Uploads, Volumes
from gpuprovider.service.journal import Journal
from gpuprovider.service.market import MarketService
from gpuprovider.service.metrics import Metrics
from gpuprovider.service.nodes import NodeService
from gpuprovider.service.pipelines import PipelineService, PipelineTimers
from gpuprovider.service.proofs import ProofService
from gpuprovider.service.rentals import RentalService, rentals_dir
from gpuprovider.service.repair import RepairService, RepairSettings
from gpuprovider.service.serving import GatewaySettings, Serving
from gpuprovider.service.tasks import TaskService
from gpuprovider.service.tokens import TokenService
from gpuprovider.store.signals import Signal, Signals
from gpuprovider.store.store import Store, StoreError
from gpuprovider.telemetry.alerts import alerter_for
from gpuprovider.telemetry.rules import parse_duration, rules_in_force

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
            m.verifier_key.lower() for m in config.market.values() if isinstance(m, HubMarketConfig)
        }
        usability = Usability(config.proof.max_age_s if config.proof.required else None, trusted)
        engine = EngineProbe(config.executor.container_engine)
        self.backend = make_backend(
            BackendContext(
                config,
                home.root,
                home.tasks,
                self.node_id,
                public_key,
                partial(self.signals.fire, Signal.EXITED),
            )
        )
        framework_policy = policy(config.scheduler.policy)
        self.alerter = alerter_for(config.alerts)
        self.repair = RepairService(
            self.store,
            RepairSettings(
                rules=rules_in_force(config.repair),
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
        files = config.files
        limits = FileLimits(
            upload_quota_bytes=files.upload_quota_mib << 20,
            max_unpacked_bytes=files.max_unpacked_mib << 20,
            max_entries=files.max_entries,
            volume_quota_bytes=files.volume_quota_mib << 20,
            max_volume_bytes=files.max_volume_mib << 20,
        )
        # what live tasks need is read through the task service, made below
        self.uploads = Uploads(home.uploads, limits, lambda t: self.tasks.uploads_in_use(t))
        self.volumes = Volumes(home.volumes, limits, lambda t, n: self.tasks.mounted_by(t, n))
        self.executor = ExecutorLoop(
            self.store,
            self.backend,
            config,
            tasks_dir(config, home.tasks),
            engine,
            self.uploads,
            self.volumes,
            rentals_dir(config, home),
        )
        self.inventory = InventoryLoop(self.store, self.backend, config.inventory.interval_s)
        self.reaper = ReaperLoop(self.store, config, self.backend, PipelineTimers(self.store))
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
            (Signal.TIMERS, self.reaper.wake),
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
            uploads=self.uploads,
            volumes=self.volumes,
            home=str(home.root),
        )
        self.tasks = tasks
        tokens = TokenService(self.store)
        markets, swan = [], None
        for name, section in config.market.items():
            kind = MARKET_KINDS[section.kind]
            market = MarketService(
                self.store,
                tasks,
                tokens,
                key,
                Pricing(config.pricing),
                settings_for(name, section, config),
                kind.connector(section, key),
                lease_strategy(section.strategy, config.pricing) if section.strategy else None,
            )
            joined = kind.join(section, market)
            markets.append(market)
            self.loops += joined.loops
            swan = joined.swan or swan
            for loop in joined.loops:
                if isinstance(loop, MarketReporter):
                    self.signals.subscribe(Signal.LEASES, loop.wake)
        pipelines = PipelineService(
            self.store, tasks, config.isolation.workdir_roots, config.pipelines
        )
        self.journal = Journal(self.store)
        self.signals.subscribe(Signal.JOURNAL, self.journal.committed)
        if config.rentals.broadcast:
            rented = Broadcaster(config.rentals.broadcast_address, config.rentals.broadcast_port)
            self.signals.subscribe(Signal.RENTED, rented.changed)
        self.services = Services(
            journal=self.journal,
            tasks=tasks,
            uploads=self.uploads,
            volumes=self.volumes,
            nodes=NodeService(self.store, usability),
            repair=self.repair,
            metrics=self.metrics,
            serving=self.serving,
            tokens=tokens,
            markets=markets,
            swan=swan,
            rentals=RentalService(self.store, config, rentals_dir(config, home)),
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
            dashboard=Dashboard(self.store, usability, markets),
            pipelines=pipelines,
        )

    def _compile_reads(self) -> None:
        """Run once, off the loop, the reads a task's page makes (its allocation, its
        node, its events): SQLAlchemy compiles a statement the first time it runs, about
        0.1 s of CPU for these, which would otherwise fall on the loop's first request."""
        with self.store.read() as r:
            r.tasks.allocation("t-none")
            r.nodes.list(["n-none"], removed=True)
            r.tasks.events("t-none")

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
        # register the nodes (and connect a cluster) first, then the preflight checks
        # before binding (the API port must still be free): on a thread, as all that waits
        await asyncio.to_thread(self.inventory.tick)
        await asyncio.to_thread(self.preflight)
        sock = bind_api_socket(self.config.api.host, self.config.api.port)
        try:
            app = build_asgi(self.services, self.config.api.max_body_bytes)
            # what FastAPI and the store do once, at length (the OpenAPI schema, compiling
            # the first statements): on a thread, before the loop serves anyone
            await asyncio.to_thread(app.app.openapi)
            await asyncio.to_thread(self.services.tasks.counts, None)
            await asyncio.to_thread(self._compile_reads)
            server = _Server(
                uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
            )
            self.alerter.start()
            self.journal.start()
            for loop in self.loops:
                loop.start()
            gateway = self.config.gateway
            if gateway.enabled:
                ensure_gateway_token(self.home, self.services.tokens, self.node_id)
                start_gateway(self.home)
            log.info(
                "gpuprovider ready: API http://%s:%d/api/v1, dashboard http://%s:%d/ui/, %s "
                "(home %s)",
                self.config.api.host,
                self.config.api.port,
                self.config.api.host,
                self.config.api.port,
                f"services at {'https' if gateway.tls_cert else 'http'}://{gateway.host}:"
                f"{gateway.port}/s/NAME/"
                if gateway.enabled
                else "no gateway ([gateway] enabled = false)",
                self.home.root,
            )
            event_loop = asyncio.get_running_loop()
            stopping = app.app.state.stopping = asyncio.Event()  # ends open event streams

            def stop() -> None:
                server.should_exit = True
                stopping.set()

            for sig in (signal.SIGINT, signal.SIGTERM):
                event_loop.add_signal_handler(sig, stop)
            await server.serve(sockets=[sock])  # returns once should_exit is set
            for loop in self.loops:
                await asyncio.to_thread(loop.stop)
            await asyncio.to_thread(self.alerter.stop)
            await asyncio.to_thread(self.journal.stop)
            if self.config.gateway.enabled:
                await asyncio.to_thread(stop_gateway, self.home)
            log.info("gpuprovider stopped; running tasks keep running and are re-adopted on start")
        finally:
            sock.close()
            self.backend.close()
            self.store.close()
            lock.close()


def run_daemon(home: Home, config: ProviderConfig) -> None:
    # what the daemon makes in the home (the store, logs, the gateway's files) is its
    # alone; tasks set their own umask (backends/runner.py)
    os.umask(0o077)
    make_private(home)
    watch = loopwatch.limit_ms()
    if watch is None:
        uvloop.run(Daemon(home, config).serve())
    else:  # the loop watch needs the standard loop (tests, diagnosis)
        loopwatch.install(watch)
        asyncio.run(Daemon(home, config).serve())
