"""Services behind the gateway: a named replica set per service submission, kept at its
wanted size, scaled by hand or by the autoscaler from the router's figures, and the
routes the gateway serves them by.

Each replica is a task like any other (placed by the scheduler, restarted by the
lifecycle's service rules) that its service owns: what its transitions cause for the
service (replaced when it ends, the service live once one runs, stopped once the last
of a stopping one ends) is `lifecycle/services.py`'s, in the same transaction. The
daemon's service loop only acts on the router's figures: it autoscales, and stops
drained replicas once nothing is in flight on them."""

from __future__ import annotations

import math
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import IntegrityError

from gpuprovider.domain.records import OwnerKind, ServiceRecord, TaskRecord, TokenRecord
from gpuprovider.domain.rentals import RentalRecord, RentalState, route_name
from gpuprovider.domain.services import ACTIVE
from gpuprovider.domain.spec import DNS_LABEL_PATTERN, Readiness, TaskSpec
from gpuprovider.domain.states import TaskState
from gpuprovider.lifecycle import services as lifecycle
from gpuprovider.lifecycle.kernel import Stale
from gpuprovider.service.errors import Conflict, NotFound, Rejected
from gpuprovider.store.store import Store, Tx

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
        self._high_since: dict[str, float] = {}  # service id -> load above target since
        self._low_since: dict[str, float] = {}
        self._lock = threading.Lock()

    # -- made with its first replica ----------------------------------------------

    def register(
        self,
        tx: Tx,
        spec: TaskSpec,
        tenant: str,
        owner: tuple[OwnerKind, str] | None = None,
    ) -> ServiceRecord:
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
        return tx.services.insert(name, tenant, spec, wanted, owner)

    # -- the service loop ------------------------------------------------------------

    def reconcile(self, now: float | None = None) -> None:
        """One pass on the router's figures: autoscale each active service, and stop
        each drained replica once the router says nothing is in flight on it (or after
        DRAIN_MAX_S). Replicas' own transitions need no pass: their rules act at once."""
        now = now or time.time()
        with self.store.read() as r:
            services = r.services.list()
        for service in services:
            try:
                self._autoscale(service, now)
                self._finish_drains(service, now)
            except (Stale, IntegrityError):
                continue  # changed meanwhile: the next pass decides again
        names = {s.name for s in services}
        with self._lock:  # figures of services gone (or never ours) are not kept
            for name in [n for n in self.figures if n not in names]:
                del self.figures[name]

    def _finish_drains(self, service: ServiceRecord, now: float) -> None:
        figures = self.figures.get(service.name)
        for task_id, since in service.draining.items():
            in_flight = ((figures.replicas.get(task_id) or {}) if figures else {}).get(
                "in_flight", 0
            )
            reported_after = figures is not None and figures.at > since + 1.0
            if (reported_after and in_flight == 0) or now - since > DRAIN_MAX_S:
                why = "nothing in flight" if reported_after and not in_flight else "drain timeout"
                with self.store.tx() as tx:
                    lifecycle.drained(tx, service, task_id, why)

    def _autoscale(self, service: ServiceRecord, now: float) -> None:
        spec = service.task_spec.serve
        scale = spec.autoscale if spec else None
        figures = self.figures.get(service.name)
        if scale is None or figures is None or now - figures.at > STATS_STALE_S:
            return
        load: float
        target: float | None
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
            if current is None or current.state not in ACTIVE:
                return
            why = (
                f"autoscale {current.replicas} -> {want}: {load:g} {what} against a target "
                f"of {target:g} per replica"
            )
            lifecycle.scale(tx, current, want, why)
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
            r_rentals = [x for x in r.rentals.list() if x.state == RentalState.RUNNING]
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
                    "draining": task.id in service.draining,
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
        out += self._rental_routes(r_rentals, addresses, {str(s["name"]) for s in out})
        hashes: dict[str, list[str]] = {}
        for token_hash, whom in callers:
            hashes.setdefault(whom, []).append(token_hash)
        return {"services": out, "token_hashes": hashes}

    @staticmethod
    def _rental_routes(
        rentals: list[RentalRecord], addresses: dict[str, str], taken: set[str]
    ) -> list[dict[str, Any]]:
        """Each running rental's HTTP ports, as one-replica routes named
        `<rental>-<port>` with the tenant's tokens (a service of that name wins)."""
        out = []
        for rental in rentals:
            address = addresses.get(rental.node_id or "")
            for port in rental.rental_spec.ports:
                name = route_name(rental.name, port.name)
                if not port.http or address is None or name in taken:
                    continue
                replica = {"task_id": rental.task_id, "address": address,
                           "port": rental.ports[port.name], "draining": False}  # fmt: skip
                out.append(
                    {"id": rental.id, "name": name, "tenant": rental.tenant, "auth": "token",
                     "sticky": False, "max_body_bytes": 100 << 20, "rate_per_s": None,
                     "readiness": Readiness().model_dump(), "replicas": [replica]}
                )  # fmt: skip
        return out

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
        if figures is not None and time.time() - figures.at > STATS_STALE_S:
            figures = None  # stale: shown as unknown
        fresh = figures is not None
        ready = sum(
            1 for v in (figures.replicas.values() if figures is not None else []) if v.get("ready")
        )
        view: dict[str, Any] = {
            "id": service.id,
            "name": service.name,
            "tenant": service.tenant,
            "state": service.state.value,
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
                    "draining": t.id in service.draining,
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
                if figures is not None
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
            events = [{"at": e.at, "reason": e.reason} for e in r.services.events(service.id)]
            return self.view(service, live, events)

    def scale(self, ref: str, replicas: int, who: TokenRecord) -> dict[str, Any]:
        with self.store.tx() as tx:
            service = self._find(tx, ref, who)
            if service.state not in ACTIVE:
                raise Conflict(f"service {service.name} is {service.state}")
            scale = service.task_spec.serve.autoscale if service.task_spec.serve else None
            if scale is not None and not scale.min <= replicas <= scale.max:
                raise Rejected(
                    f"replicas: service {service.name} autoscales between {scale.min} and "
                    f"{scale.max}; {replicas} is outside"
                )
            why = f"scaled {service.replicas} -> {replicas} by {who.name}"
            lifecycle.scale(tx, service, replicas, why)
        return self.get(service.id, who)

    def stop(self, ref: str, who: TokenRecord) -> dict[str, Any]:
        for _ in range(5):
            try:
                with self.store.tx() as tx:
                    service = self._find(tx, ref, who)
                    if service.state not in ACTIVE:
                        raise Conflict(f"service {service.name} is {service.state} already")
                    lifecycle.stop(tx, service, who.name)
                return self.get(service.id, who)
            except Stale:
                continue  # a replica changed under the stop: read again and stop again
        raise Conflict(f"service {ref} keeps changing; try the stop again")
