"""Services behind the gateway: a named replica set per service submission, kept at its
wanted size (a replica that ends is replaced), scaled by hand or by the autoscaler
from the router's figures, and the routes the gateway serves them by.

Each replica is a task like any other (placed by the scheduler, restarted by the
lifecycle's service rules); `Serving.reconcile`, run by the daemon's service loop, adds
and drains replicas until the live count is the wanted one."""

from __future__ import annotations

import math
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import IntegrityError

from gpuprovider.domain.records import ServiceRecord, TaskRecord, TokenRecord
from gpuprovider.domain.spec import DNS_LABEL_PATTERN, Readiness, TaskSpec
from gpuprovider.domain.states import TaskState
from gpuprovider.lifecycle import tasks as lifecycle
from gpuprovider.service.errors import Conflict, NotFound, Rejected
from gpuprovider.store.store import Store, Tx
from gpuprovider.store.tasks import StaleTask

DRAIN_MAX_S = 120.0  # a replica being drained is stopped by then, whatever is in flight
STATS_STALE_S = 5.0  # the router's figures older than this are not used to scale


@dataclass(frozen=True)
class GatewaySettings:
    """Where the gateway answers, for the URLs shown to users."""

    host: str = "127.0.0.1"
    port: int = 8086
    domain: str = ""  # empty: <name>.localhost and /s/<name>/
    tls: bool = False

    def urls(self, name: str) -> list[str]:
        """The domain's URL first (TLS by nginx or the router), then this machine's."""
        scheme = "https" if self.tls else "http"
        port = "" if (self.port, scheme) in ((80, "http"), (443, "https")) else f":{self.port}"
        local = [f"{scheme}://{name}.localhost{port}/", f"{scheme}://{self.host}{port}/s/{name}/"]
        return ([f"https://{name}.{self.domain}/"] if self.domain else []) + local


def derived_name(spec: TaskSpec) -> str | None:
    """A service's name from its task name (`My_Model.v2` -> `my-model-v2`), or None."""
    if not spec.name:
        return None
    name = re.sub(r"[^a-z0-9-]+", "-", spec.name.lower()).strip("-")[:63].strip("-")
    return name if re.match(DNS_LABEL_PATTERN, name) else None


@dataclass
class ServiceFigures:
    """What the router last reported of a service."""

    at: float
    requests: dict[str, int] = field(default_factory=dict)  # window -> count
    errors: dict[str, int] = field(default_factory=dict)
    rps: dict[str, float] = field(default_factory=dict)
    latency_p50_ms: dict[str, float | None] = field(default_factory=dict)
    ttfb_p50_ms: dict[str, float | None] = field(default_factory=dict)
    in_flight: int = 0
    replicas: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> ready, in flight
    total: int = 0  # requests since the router started
    router_started: float = 0.0


class Serving:
    def __init__(self, store: Store, gateway: GatewaySettings):
        self.store, self.gateway = store, gateway
        self.figures: dict[str, ServiceFigures] = {}  # service name -> latest report
        self._draining: dict[str, float] = {}  # task id -> since when
        self._high_since: dict[str, float] = {}  # service id -> load above target since
        self._low_since: dict[str, float] = {}
        self._lock = threading.Lock()

    # -- made with its first replica ----------------------------------------------

    def register(self, tx: Tx, spec: TaskSpec, tenant: str) -> ServiceRecord:
        """The service a service task starts (in the submitting transaction): its name
        asked for (409 when a live service has it), else one from the task's name, made
        unique if another tenant's service has it."""
        serve = spec.serve
        wanted = serve.starting_replicas if serve else 1
        if serve and serve.name:
            if holder := tx.services.live_named(serve.name):
                raise Conflict(
                    f"serve.name: service {serve.name!r} is live already"
                    + (f" ({holder.id})" if holder.tenant == tenant else " (another tenant's)")
                    + "; choose another name"
                )
            name = serve.name
        else:
            base = derived_name(spec) or "svc"
            name = base
            while name == "svc" or tx.services.live_named(name):
                name = f"{base[:56]}-{secrets.token_hex(3)}"
        return tx.services.insert(name, tenant, spec, wanted)

    def add_replicas(
        self, tx: Tx, service: ServiceRecord, count: int, why: str
    ) -> list[TaskRecord]:
        made = []
        for _ in range(count):
            number = service.next_replica + 1
            tx.services.update(service, next_replica=number)
            spec = service.task_spec.model_copy(update={"name": f"{service.name}.r{number}"})
            task = tx.tasks.insert(spec, service.tenant, service_id=service.id)
            lifecycle.submit(tx, task)
            made.append(task)
        if made:
            tx.services.event(service.id, f"{why}: started {', '.join(t.label for t in made)}")
        return made

    # -- the service loop ------------------------------------------------------------

    def reconcile(self, now: float | None = None) -> None:
        """One pass: each live service to its wanted replica count (autoscaled first)."""
        now = now or time.time()
        with self.store.read() as r:
            services = r.services.list()
            replicas = r.tasks.replicas(s.id for s in services)
        for service in services:
            try:
                self._autoscale(service, replicas[service.id], now)
                self._converge(service, replicas[service.id], now)
            except (StaleTask, IntegrityError):
                continue  # changed meanwhile: the next pass decides again
        live = {t.id for tasks in replicas.values() for t in tasks}
        for task_id in [t for t in self._draining if t not in live]:
            self._draining.pop(task_id, None)  # ended
        names = {s.name for s in services}
        with self._lock:  # figures of services gone (or never ours) are not kept
            for name in [n for n in self.figures if n not in names]:
                del self.figures[name]

    def _converge(self, service: ServiceRecord, live: list[TaskRecord], now: float) -> None:
        serving = [
            t for t in live if t.id not in self._draining and t.state != TaskState.CANCELLING
        ]
        if len(serving) < service.replicas:
            missing = service.replicas - len(serving)
            with self.store.tx() as tx:
                current = tx.services.get(service.id)
                if current is None or current.state != "live":
                    return
                self.add_replicas(
                    tx, current, missing, f"{len(serving)} of {service.replicas} replicas live"
                )
        elif len(serving) > service.replicas:
            for task in sorted(serving, key=lambda t: t.created_at)[service.replicas :]:
                self._draining.setdefault(task.id, now)
                with self.store.tx() as tx:
                    tx.services.event(
                        service.id, f"draining {task.label}: {service.replicas} replicas wanted"
                    )
        figures = self.figures.get(service.name)
        for task in live:
            since = self._draining.get(task.id)
            if since is None or task.state == TaskState.CANCELLING:
                continue
            in_flight = ((figures.replicas.get(task.id) or {}) if figures else {}).get(
                "in_flight", 0
            )
            reported_after = figures is not None and figures.at > since + 1.0
            if (reported_after and in_flight == 0) or now - since > DRAIN_MAX_S:
                with self.store.tx() as tx:
                    lifecycle.request_cancel(tx, task, f"service {service.name} scaling down")

    def _autoscale(self, service: ServiceRecord, live: list[TaskRecord], now: float) -> None:
        spec = service.task_spec.serve
        scale = spec.autoscale if spec else None
        figures = self.figures.get(service.name)
        if scale is None or figures is None or now - figures.at > STATS_STALE_S:
            return
        if scale.target_in_flight is not None:
            load, target, what = figures.in_flight, scale.target_in_flight, "requests in flight"
        else:
            load, target, what = figures.rps.get("60s", 0.0), scale.target_rps, "requests/s (60 s)"
        assert target is not None
        want = min(scale.max, max(scale.min, math.ceil(load / target) if load else scale.min))
        if want > service.replicas:
            self._low_since.pop(service.id, None)
            since = self._high_since.setdefault(service.id, now)
            if now - since < scale.up_delay_s:
                return
        elif want < service.replicas:
            self._high_since.pop(service.id, None)
            since = self._low_since.setdefault(service.id, now)
            if now - since < scale.down_delay_s:
                return
        else:
            self._high_since.pop(service.id, None)
            self._low_since.pop(service.id, None)
            return
        with self.store.tx() as tx:
            current = tx.services.get(service.id)
            if current is None or current.state != "live":
                return
            tx.services.update(current, replicas=want)
            tx.services.event(
                service.id,
                f"autoscale {service.replicas} -> {want}: {load:g} {what} against a target "
                f"of {target:g} per replica",
            )
        service.replicas = want
        self._high_since.pop(service.id, None)
        self._low_since.pop(service.id, None)

    # -- the router's side ---------------------------------------------------------

    def routes(self) -> dict[str, Any]:
        """What the gateway serves: every live service, its settings, its replicas that
        run (with where to reach them) and the hashes of the tokens that may call it."""
        with self.store.read() as r:
            services = r.services.list()
            callers = r.tokens.callers(time.time())
            replicas = r.tasks.replicas(s.id for s in services)
            running = [
                t for tasks in replicas.values() for t in tasks if t.state == TaskState.RUNNING
            ]
            held = {a.task_id: a for a in r.tasks.active_allocations_of(t.id for t in running)}
            addresses = {n.id: n.address for n in r.nodes.list()}
        out = []
        for service in services:
            spec = service.task_spec
            port_name = spec.route_port
            reachable = [
                {
                    "task_id": task.id,
                    "address": addresses[held[task.id].node_id],
                    "port": held[task.id].ports[port_name],
                    # no new requests; kept until what it serves has finished
                    "draining": task.id in self._draining,
                }
                for task in replicas[service.id]
                if task.state == TaskState.RUNNING
                and task.id in held
                and port_name in held[task.id].ports
                and held[task.id].node_id in addresses
            ]
            serve = spec.serve
            out.append(
                {
                    "id": service.id,
                    "name": service.name,
                    "tenant": service.tenant,
                    "auth": serve.auth if serve else "token",
                    "sticky": bool(serve and serve.sticky),
                    "max_body_bytes": serve.max_body_bytes if serve else 100 << 20,
                    "rate_per_s": serve.rate_per_s if serve else None,
                    "readiness": (serve.readiness if serve else Readiness()).model_dump(),
                    "replicas": reachable,
                }
            )
        hashes: dict[str, list[str]] = {}
        for token_hash, whom in callers:
            hashes.setdefault(whom, []).append(token_hash)
        return {"services": out, "token_hashes": hashes}

    def report(self, reports: list[dict[str, Any]]) -> None:
        """The router's figures per service (every second or so)."""
        now = time.time()
        with self._lock:
            for item in reports:
                self.figures[item["name"]] = ServiceFigures(
                    at=now,
                    requests=item.get("requests", {}),
                    errors=item.get("errors", {}),
                    rps=item.get("rps", {}),
                    latency_p50_ms=item.get("latency_p50_ms", {}),
                    ttfb_p50_ms=item.get("ttfb_p50_ms", {}),
                    in_flight=int(item.get("in_flight", 0)),
                    replicas=item.get("replicas", {}),
                    total=int(item.get("total", 0)),
                    router_started=float(item.get("router_started", 0.0)),
                )

    def served(self, name: str) -> tuple[float, int] | None:
        """(when the router started, requests it has passed to the service `name` since),
        from its latest report; None before one."""
        with self._lock:
            figures = self.figures.get(name)
        return (figures.router_started, figures.total) if figures else None

    # -- what people see and do -------------------------------------------------------

    def _find(self, tx: Tx, ref: str, who: TokenRecord) -> ServiceRecord:
        service = tx.services.get(ref, None if who.is_admin else who.tenant)
        if service is None:
            raise NotFound(f"no service {ref!r}; `gpuprovider service list` shows them")
        return service

    def brief(self, service_id: str) -> dict[str, Any] | None:
        with self.store.read() as r:
            service = r.services.get(service_id)
        if service is None:
            return None
        return {"id": service.id, "name": service.name, "urls": self.gateway.urls(service.name)}

    def view(
        self, service: ServiceRecord, live: list[TaskRecord], events: list | None = None
    ) -> dict[str, Any]:
        spec = service.task_spec
        figures = self.figures.get(service.name)
        fresh = figures is not None and time.time() - figures.at <= STATS_STALE_S
        ready = sum(1 for v in (figures.replicas.values() if fresh else []) if v.get("ready"))
        view: dict[str, Any] = {
            "id": service.id,
            "name": service.name,
            "tenant": service.tenant,
            "state": service.state,
            "urls": self.gateway.urls(service.name),
            "auth": spec.serve.auth if spec.serve else "token",
            "replicas_wanted": service.replicas,
            "replicas_live": len(live),
            "replicas_ready": ready if fresh else None,
            "autoscale": spec.serve.autoscale.model_dump()
            if spec.serve and spec.serve.autoscale
            else None,
            "replicas": [
                {
                    "task_id": t.id,
                    "name": t.label,
                    "state": t.state.value,
                    "draining": t.id in self._draining,
                }
                for t in live
            ],
            "stats": (
                {
                    "requests": figures.requests,
                    "errors": figures.errors,
                    "rps": figures.rps,
                    "latency_p50_ms": figures.latency_p50_ms,
                    "ttfb_p50_ms": figures.ttfb_p50_ms,
                    "in_flight": figures.in_flight,
                }
                if fresh
                else None
            ),
        }
        if events is not None:
            view["events"] = events
        return view

    def list(self, who: TokenRecord) -> list[dict[str, Any]]:
        with self.store.read() as r:
            services = r.services.list(None if who.is_admin else who.tenant)
            replicas = r.tasks.replicas(s.id for s in services)
            return [self.view(s, replicas[s.id]) for s in services]

    def get(self, ref: str, who: TokenRecord) -> dict[str, Any]:
        with self.store.read() as r:
            service = self._find(r, ref, who)
            live = r.tasks.replicas([service.id])[service.id]
            return self.view(service, live, r.services.events(service.id))

    def scale(self, ref: str, replicas: int, who: TokenRecord) -> dict[str, Any]:
        with self.store.tx() as tx:
            service = self._find(tx, ref, who)
            if service.state != "live":
                raise Conflict(f"service {service.name} is stopped")
            scale = service.task_spec.serve.autoscale if service.task_spec.serve else None
            if scale is not None and not scale.min <= replicas <= scale.max:
                raise Rejected(
                    f"replicas: service {service.name} autoscales between {scale.min} and "
                    f"{scale.max}; {replicas} is outside"
                )
            before = service.replicas
            tx.services.update(service, replicas=replicas)
            tx.services.event(service.id, f"scaled {before} -> {replicas} by {who.name}")
        self.reconcile()
        return self.get(service.id, who)

    def stop(self, ref: str, who: TokenRecord) -> dict[str, Any]:
        with self.store.tx() as tx:
            service = self._find(tx, ref, who)
            if service.state != "live":
                raise Conflict(f"service {service.name} is stopped already")
            tx.services.update(service, state="stopped", replicas=0)
            tx.services.event(service.id, f"stopped by {who.name}")
            for task in tx.tasks.replicas([service.id])[service.id]:
                if task.state != TaskState.CANCELLING:
                    lifecycle.request_cancel(tx, task, who.name)
        return self.get(service.id, who)
