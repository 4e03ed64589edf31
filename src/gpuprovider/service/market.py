"""The provider's side of a market (the reference hub, or a push market such as Swan):
register, price and bid on orders, realise won leases as tasks, report their state and
signed, hash-chained usage, and close them. Called from the event reader (`handle`) or
a push market's routes, and from the maintainer (`maintain`); every step is one short
transaction on the lease's row."""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from gpuprovider.domain.records import TokenRecord
from gpuprovider.domain.spec import TaskSpec
from gpuprovider.domain.states import TERMINAL, TaskState
from gpuprovider.market.client import Event, MarketRefused, MarketUnreachable
from gpuprovider.market.connector import Connector
from gpuprovider.market.model import (
    Action,
    CloseReason,
    Decision,
    LeaseState,
    Order,
    charge,
)
from gpuprovider.market.pricing import PricingPolicy, Unpriceable
from gpuprovider.market.usage import Usage, genesis, seal
from gpuprovider.service.errors import ServiceError
from gpuprovider.service.tasks import TaskService
from gpuprovider.service.tokens import TokenService
from gpuprovider.store.store import Store

log = logging.getLogger(__name__)
L = LeaseState
LIVE = {L.AWAITING_PAYLOAD, L.PROVISIONING, L.RUNNING, L.CLOSING}
REPORTED = {L.PROVISIONING: "provisioning", L.RUNNING: "running", L.CLOSED: "closed"}


@dataclass
class MarketSettings:
    name: str  # the market's name in config: [market.<name>]
    url: str  # the hub; "" for a push market
    api_url: str  # where the hub's verifier reaches this provider's API
    provider_name: str  # this provider's name on the hub
    priority: int = 500  # lease tasks' priority: the operator's preemptible work gives way
    heartbeat_s: float = 10.0
    usage_interval_s: float = 60.0
    bid_valid_s: float = 60.0


@dataclass
class Progress:
    running: bool  # something of the lease runs
    ended: bool  # and will not again
    succeeded: bool
    ended_at: float
    detail: str


def lease_spec(
    lease_id: str, order: Order, model: str, priority: int, market: str, renewable: bool = False
) -> TaskSpec:
    """The task that realises a lease: the tenant's payload, with the order's resources,
    duration and the market's priority (the payload cannot raise or lower them). A
    renewable lease's task has no deadline of its own: `maintain` ends it on time."""
    payload = dict(order.payload or {})
    r = order.resources
    labels = dict(payload.get("labels") or {}) | {"market": market, "lease": lease_id}
    payload |= {
        "name": f"lease-{lease_id}"[:63],
        "kind": order.kind,
        "resources": {
            "gpu": f"{model}:{r.gpus:g}" if r.gpus else "0",
            "cpu": r.cpus,
            "memory_mib": int(r.memory_gb * 1024),
        },
        "priority": priority,
        "preemptible": False,
        "max_duration_s": None if renewable else float(order.duration_s),
        "labels": labels,
    }
    return TaskSpec.model_validate(payload)


class MarketService:
    def __init__(
        self,
        store: Store,
        tasks: TaskService,
        tokens: TokenService,
        key: Ed25519PrivateKey,
        pricing: PricingPolicy,
        settings: MarketSettings,
        connector: Connector,
    ):
        self.store, self.tasks, self.tokens, self.key = store, tasks, tokens, key
        self.pricing, self.settings = pricing, settings
        self.market = settings.name
        self.connector = connector
        self.who = TokenRecord(
            id=f"market:{self.market}",
            name=f"market:{self.market}",
            scopes=["read", "submit"],
            tenant=f"market-{self.market}",
            created_at=time.time(),
        )
        self.registered = False
        self.figures = {"orders": 0, "bids": 0, "declined": 0, "won": 0, "lost": 0}

    # -- joining --------------------------------------------------------------------

    def register(self) -> None:
        """Register with the hub, giving it a fresh verify token so its verifier can
        prove this provider's GPUs (the hub's key must be in [proof] trusted_verifiers);
        once the hub holds it, the tokens given before are revoked. A push market needs
        no token: it proves nothing here."""
        prefix = f"market-{self.market}-"
        made = {"name": "", "token": ""}
        if not self.connector.pushes:
            made = self.tokens.create(
                f"{prefix}{int(time.time())}-{secrets.token_hex(2)}",
                ["read", "verify"],
                tenant=self.who.tenant,
                expires_in_s=7 * 86400,
            )
        answer = self.connector.register(
            self.settings.provider_name, self.settings.api_url, made["token"]
        )
        self._cursor(status=answer["status"], status_reason=answer["status_reason"])
        self.registered = True
        given_before = [
            token["name"]
            for token in self.tokens.list()
            if token["name"].startswith(prefix)
            and token["name"] != made["name"]
            and token["revoked_at"] is None
        ]
        for name in given_before:
            self.tokens.revoke(name)

    def _cursor(self, **values: Any) -> None:
        with self.store.tx() as tx:
            tx.market.set_cursor(self.market, **values)

    def cursor(self) -> dict[str, Any]:
        with self.store.read() as r:
            return r.market.cursor(self.market)

    # -- events ---------------------------------------------------------------------

    def handle(self, event: Event) -> None:
        """One event from the hub; a malformed one is logged and skipped."""
        try:
            if event.kind == "admission":
                self._cursor(
                    status=str(event.data["status"]),
                    status_reason=str(event.data.get("reason", ""))[:2000],
                )
            elif event.kind == "order":
                self.on_order(event.data)
            elif event.kind == "won":
                self.on_won(
                    str(event.data["lease_id"]),
                    int(event.data["price_per_hour"]),
                    event.data["order"],
                )
            elif event.kind == "lost":
                self._settle_offer(str(event.data["order_id"]), L.LOST, "another provider won")
            elif event.kind == "close":
                self.on_close(str(event.data["lease_id"]), str(event.data["reason"]))
        except (KeyError, TypeError, ValueError, ValidationError) as exc:
            log.warning("market %s: skipped a malformed %s event: %s", self.market, event.kind, exc)
        self._cursor(last_event=event.seq)

    def decide(self, order: Order, mode: str) -> tuple[Decision, str]:
        """(decision, GPU model priced) for an order: the cheapest of our models that fits
        now or once the operator's preemptible work gives way, if under the cap."""
        reasons, quotes = [], []
        with self.store.read() as r:
            ours = {g.model for n in r.nodes.list() for g in n.gpus if g.present}
        models = (
            sorted(m for m in ours if order.resources.accepts(m)) if order.resources.gpus else [""]
        )
        if not models:
            wanted = order.resources.gpu_model or "any GPU"
            return Decision(Action.DECLINE, f"no {wanted} here"), ""
        # a payload still to come is judged by its resources alone
        probe = (
            order if order.payload else order.model_copy(update={"payload": {"command": ["true"]}})
        )
        for model in models:
            try:
                spec = lease_spec(order.id, probe, model, self.settings.priority, self.market)
                now, later, why = self.tasks.placeable(spec)
                if not (now or later):
                    reasons.append(f"{model or 'no GPU'}: {why}")
                    continue
                quotes.append((self.pricing.quote(order, model or "cpu"), model))
            except Unpriceable as exc:
                reasons.append(str(exc))
            except ValidationError as exc:
                return Decision(
                    Action.DECLINE, f"payload is not a task spec: {exc.errors()[0]['msg']}"
                ), ""
        if not quotes:
            return Decision(Action.DECLINE, "; ".join(reasons) or "cannot run it"), ""
        quote, model = min(quotes, key=lambda q: q[0].price_per_hour)
        if quote.price_per_hour > order.max_price_per_hour:
            return Decision(
                Action.DECLINE,
                f"our price {quote.price_per_hour} is above the cap {order.max_price_per_hour} "
                f"micros per hour ({quote.explain()})",
            ), model
        action = Action.BID if mode == "auction" else Action.ACCEPT
        expires = time.time() + self.settings.bid_valid_s
        return Decision(action, quote.explain(), quote.price_per_hour, expires), model

    def on_order(self, data: dict[str, Any]) -> None:
        order = Order.model_validate(data["order"])
        mode = str(data.get("mode", "auction"))
        self.figures["orders"] += 1
        with self.store.read() as r:
            if r.market.get(order.id):
                return  # seen before (a resumed stream)
        decision, model = self.decide(order, mode)
        state = L.LOST if decision.action == Action.DECLINE else L.BIDDING
        with self.store.tx() as tx:
            tx.market.add(
                order.id,
                self.market,
                state.value,
                order.model_dump(),
                model=model,
                price_per_hour=decision.price_per_hour,
                reason=decision.reason,
            )
        try:
            self.connector.respond(order.id, mode, decision)
            self.figures["declined" if decision.action == Action.DECLINE else "bids"] += 1
        except (MarketRefused, MarketUnreachable) as exc:
            self._settle_offer(order.id, L.EXPIRED, f"the hub refused the answer: {exc}")

    def _settle_offer(self, lease_id: str, state: LeaseState, reason: str) -> None:
        with self.store.tx() as tx:
            lease = tx.market.get(lease_id)
            if lease and lease["state"] in (L.OFFERED.value, L.BIDDING.value):
                tx.market.set(lease_id, state=state.value, reason=reason)
                self.figures["lost"] += state == L.LOST

    def on_won(self, lease_id: str, price: int, raw_order: dict[str, Any]) -> None:
        """Run a won lease: the order as this provider priced it (its row, written before
        the bid went out), at no less than its price. A win it never bid on, one it
        declined, or one below its price is refused, and reported closed."""
        with self.store.tx() as tx:
            lease = tx.market.get(lease_id)
            refusal = ""
            if lease is None:
                tx.market.add(
                    lease_id,
                    self.market,
                    L.LOST.value,
                    Order.model_validate(raw_order).model_dump(),
                )
                refusal = "this provider never bid on it"
            elif lease["state"] == L.LOST.value and lease["reported"] != "closed":
                refusal = f"this provider declined it ({lease['reason'][:200]})"
            elif lease["state"] not in (L.OFFERED.value, L.BIDDING.value):
                return  # a repeated event
            elif price < lease["price_per_hour"]:
                refusal = f"won at {price}, below this provider's price {lease['price_per_hour']}"
            if refusal:
                tx.market.set(
                    lease_id,
                    state=L.CLOSED.value,
                    close_reason=CloseReason.FAILED.value,
                    reason=f"refused the win: {refusal}",
                )
                return
            order = Order.model_validate(lease["order"])  # not the hub's copy: what was priced
            self.figures["won"] += 1
            if order.payload is None:
                tx.market.set(lease_id, state=L.AWAITING_PAYLOAD.value, price_per_hour=price)
                return
            tx.market.set(lease_id, state=L.WON.value, price_per_hour=price)
        model = lease["model"] or self._any_model(order)
        try:
            spec = lease_spec(
                lease_id,
                order,
                model,
                self.settings.priority,
                self.market,
                renewable=self.connector.pushes,
            )
            view, _ = self.tasks.submit(spec, self.who, idempotency_key=lease_id)
        except (ValidationError, ServiceError) as exc:
            self._closed(lease_id, CloseReason.FAILED, f"could not start: {exc}")
            return
        endpoint = ""
        if service := view.get("service"):
            endpoint = (service.get("urls") or [""])[0]
        with self.store.tx() as tx:
            tx.market.set(
                lease_id, state=L.PROVISIONING.value, task_id=view["id"], endpoint=endpoint
            )

    def _any_model(self, order: Order) -> str:
        with self.store.read() as r:
            ours = {g.model for n in r.nodes.list() for g in n.gpus if g.present}
        fits = sorted(m for m in ours if order.resources.accepts(m))
        return fits[0] if fits else "0"

    def on_close(self, lease_id: str, reason: str) -> None:
        """The hub ends the lease: stop its tasks; `maintain` reports once they stopped."""
        with self.store.tx() as tx:
            lease = tx.market.get(lease_id)
            if lease is None or lease["state"] in (L.CLOSED.value, L.CLOSING.value):
                return
            tx.market.set(lease_id, state=L.CLOSING.value, close_reason=CloseReason(reason).value)
        if not lease["task_id"]:
            return
        with self.store.read() as r:
            task = r.tasks.get(lease["task_id"])
        with contextlib.suppress(ServiceError):  # already over: maintain sees it
            if task and task.service_id:  # a service: stop the replica set, not one replica
                self.tasks.serving.stop(task.service_id, self.who)
            else:
                self.tasks.cancel(lease["task_id"], self.who)

    # -- keeping leases in step -----------------------------------------------------

    def _closed(self, lease_id: str, reason: CloseReason, detail: str) -> None:
        with self.store.tx() as tx:
            lease = tx.market.get(lease_id)
            if lease and lease["state"] != L.CLOSED.value:
                tx.market.set(
                    lease_id,
                    state=L.CLOSED.value,
                    close_reason=lease["close_reason"] or reason.value,
                    reason=detail[:2000],
                    ended_at=lease["ended_at"] or time.time(),
                )

    def beat(self) -> None:
        """Tell the hub this provider is alive (its own thread: nothing slow delays it)."""
        if not self.registered:
            return
        try:
            self.connector.beat()
        except (MarketRefused, MarketUnreachable) as exc:
            log.warning("market %s: heartbeat failed: %s", self.market, exc)

    def maintain(self) -> None:
        """Follow each live lease's task, report states and usage."""
        now = time.time()
        with self.store.read() as r:
            leases = r.market.list(self.market, {s.value for s in LIVE} | {L.CLOSED.value})
            progress = {
                lease["id"]: self._progress(r, lease["task_id"], now)
                for lease in leases
                if lease["task_id"] and lease["state"] != L.CLOSED.value
            }
        for lease in leases:
            if lease["state"] != L.CLOSED.value:
                self._follow(lease, progress.get(lease["id"]), now)
        for lease in leases:
            if not (lease["state"] == L.CLOSED.value and lease["reported"] == "closed"):
                self._report(lease["id"], now)

    @staticmethod
    def _progress(r: Any, task_id: str, now: float) -> Progress | None:
        """How the work of a lease is going: its task, or for a service its replica set
        (replicas come and go; the lease lasts while the service is live)."""
        task = r.tasks.get(task_id)
        if task is None:
            return None
        if task.service_id:
            service = r.services.get(task.service_id)
            live = r.tasks.replicas([task.service_id])[task.service_id]
            stopped = service is None or (service.state != "live" and not live)
            return Progress(
                running=any(t.state == TaskState.RUNNING for t in live),
                ended=stopped,
                succeeded=False,
                ended_at=now,
                detail=f"service {service.name if service else '?'} stopped",
            )
        return Progress(
            running=task.state == TaskState.RUNNING,
            ended=task.state in TERMINAL,
            succeeded=task.state == TaskState.SUCCEEDED,
            ended_at=task.finished_at or now,
            detail=f"task {task.id} {task.state}: {task.state_reason}",
        )

    def _follow(self, lease: dict[str, Any], progress: Progress | None, now: float) -> None:
        state = L(lease["state"])
        if state == L.AWAITING_PAYLOAD:
            order = Order.model_validate(lease["order"])
            if now - lease["created_at"] > order.payload_timeout_s:
                self._closed(lease["id"], CloseReason.PAYLOAD_TIMEOUT, "the payload never came")
            return
        if progress is None:
            if state in (L.PROVISIONING, L.RUNNING, L.CLOSING):
                self._closed(lease["id"], CloseReason.FAILED, "its task is gone")
            return
        since = lease["running_since"] or lease["created_at"]
        if (
            self.connector.pushes  # a pull market (the hub) ends its leases itself
            and state in (L.PROVISIONING, L.RUNNING)
            and now - since > lease["order"]["duration_s"]
        ):
            self.on_close(lease["id"], CloseReason.EXPIRED.value)
            return
        if progress.ended:
            if state == L.CLOSING:
                reason = CloseReason(lease["close_reason"] or CloseReason.TENANT)
            else:
                reason = CloseReason.COMPLETED if progress.succeeded else CloseReason.FAILED
            with self.store.tx() as tx:
                tx.market.set(lease["id"], ended_at=progress.ended_at)
            self._closed(lease["id"], reason, progress.detail)
        elif state == L.PROVISIONING and progress.running:
            with self.store.tx() as tx:  # billed from when the hub hears of it: _report
                tx.market.set(lease["id"], state=L.RUNNING.value)

    def _report(self, lease_id: str, now: float) -> None:
        """Tell the hub what changed: usage first (up to now, or to the end), then the
        state; retried on the next pass when the hub cannot be reached."""
        with self.store.read() as r:
            lease = r.market.get(lease_id)
        state = L(lease["state"])
        try:
            if lease["running_since"] is not None:
                self._send_usage(lease, now)
            wanted = REPORTED.get(state)
            if wanted and lease["reported"] != wanted:
                details: dict[str, Any] = {}
                if state == L.RUNNING:
                    details["endpoint"] = lease["endpoint"]
                if state == L.CLOSED:
                    details |= {
                        "reason": lease["close_reason"],
                        "detail": lease["reason"][:1000],
                        "ended_at": lease["ended_at"],
                    }
                answer = self.connector.report_state(lease_id, wanted, **details)
                with self.store.tx() as tx:
                    tx.market.set(lease_id, reported=wanted)
                    if state == L.RUNNING:  # the market bills from when it heard: so do we
                        heard = answer.get("running_at")
                        sane = isinstance(heard, int | float) and abs(heard - now) < 3600
                        tx.market.set(lease_id, running_since=float(heard) if sane else now)
        except MarketUnreachable as exc:
            log.warning("market %s: lease %s not reported: %s", self.market, lease_id, exc)
        except MarketRefused as exc:
            log.warning(
                "market %s: the hub refused lease %s's report: %s", self.market, lease_id, exc
            )
            if wanted:
                with self.store.tx() as tx:
                    tx.market.set(lease_id, reported=wanted)  # never loop on a refusal

    def _send_usage(self, lease: dict[str, Any], now: float) -> None:
        start = lease["usage_until"] or lease["running_since"]
        end = min(now, lease["ended_at"] or now)
        final = lease["ended_at"] is not None
        if end <= start or (not final and end - start < self.settings.usage_interval_s):
            return
        order = Order.model_validate(lease["order"])
        seconds = end - start
        mark, requests = self._requests(lease)
        record = seal(
            self.key,
            Usage(
                lease_id=lease["id"],
                seq=lease["usage_seq"] + 1,
                start=start,
                end=end,
                gpu_seconds={lease["model"] or "cpu": order.resources.gpus * seconds},
                cpu_seconds=order.resources.cpus * seconds,
                memory_gib_seconds=order.resources.memory_gb * seconds,
                requests=requests,
                prev=lease["usage_hash"] or genesis(lease["id"]),
            ),
        )
        self.connector.report_usage(record)
        with self.store.tx() as tx:
            tx.market.set(
                lease["id"],
                usage_seq=record.seq,
                usage_hash=record.hash,
                usage_until=end,
                usage_gpu_seconds=lease["usage_gpu_seconds"] + order.resources.gpus * seconds,
                usage_requests=lease["usage_requests"] + requests,
                requests_mark=mark,
            )

    def _requests(self, lease: dict[str, Any]) -> tuple[str, int]:
        """(the gateway's count now, requests since the lease's last record) for a
        service lease. Each lease has a service of its own, so all the router passed to
        it is the lease's; a router that restarted counts again from zero (what it
        passed between the last record and its end goes uncounted, never twice)."""
        with self.store.read() as r:
            task = r.tasks.get(lease["task_id"]) if lease["task_id"] else None
            service = r.services.get(task.service_id) if task and task.service_id else None
        seen = self.tasks.serving.served(service.name) if service else None
        if seen is None:
            return lease["requests_mark"], 0
        started, total = seen
        before, _, counted = lease["requests_mark"].partition(":")
        same_router = before == f"{started:.6f}" and int(counted or 0) <= total
        return f"{started:.6f}:{total}", total - int(counted) if same_router else total

    def renew(self, lease_id: str, extra_s: int) -> dict[str, Any] | None:
        """Lengthen a live lease by `extra_s` (a push market's renewal); None when there
        is no such lease or it is over. The order stays valid: at most a year in all."""
        with self.store.tx() as tx:
            lease = tx.market.get(lease_id)
            if lease is None or L(lease["state"]) not in LIVE - {L.CLOSING}:
                return None
            order = Order.model_validate(
                lease["order"] | {"duration_s": lease["order"]["duration_s"] + extra_s}
            )
            tx.market.set(lease_id, order=order.model_dump())
        return self.lease(lease_id)

    def labelled(self, key: str, value: str) -> str | None:
        """The newest lease whose payload carries label `key`=`value`."""
        with self.store.read() as r:
            rows = r.market.list(self.market)
        for lease in reversed(rows):
            labels = (lease["order"].get("payload") or {}).get("labels") or {}
            if labels.get(key) == value:
                return lease["id"]
        return None

    # -- views ----------------------------------------------------------------------

    def lease(self, lease_id: str) -> dict[str, Any] | None:
        with self.store.read() as r:
            lease = r.market.get(lease_id)
        return self._view(lease) if lease else None

    def leases(self) -> list[dict[str, Any]]:
        with self.store.read() as r:
            rows = r.market.list(self.market)
        return [self._view(lease) for lease in rows]

    def _view(self, lease: dict[str, Any]) -> dict[str, Any]:
        order = lease["order"]
        return {
            "id": lease["id"],
            "market": lease["market"],
            "state": lease["state"],
            "model": lease["model"],
            "gpus": order["resources"]["gpus"],
            "price_per_hour": lease["price_per_hour"],
            "duration_s": order["duration_s"],
            "earned": self._earned(lease),
            "task_id": lease["task_id"],
            "endpoint": lease["endpoint"],
            "close_reason": lease["close_reason"],
            "reason": lease["reason"],
            "usage_records": lease["usage_seq"],
            "usage_gpu_seconds": round(lease["usage_gpu_seconds"], 3),
            "usage_requests": lease["usage_requests"],
        }

    @staticmethod
    def _earned(lease: dict[str, Any]) -> int:
        if lease["running_since"] is None:
            return 0
        end = lease["ended_at"] or time.time()
        seconds = min(end - lease["running_since"], lease["order"]["duration_s"])
        return charge(lease["price_per_hour"], seconds)

    def status(self) -> dict[str, Any]:
        cursor = self.cursor()
        leases = self.leases()
        by_state: dict[str, int] = {}
        for lease in leases:
            by_state[lease["state"]] = by_state.get(lease["state"], 0) + 1
        return {
            "market": self.market,
            "url": self.settings.url,
            "status": cursor["status"] or "not registered",
            "status_reason": cursor["status_reason"],
            "last_event": cursor["last_event"],
            "leases": by_state,
            "figures": dict(self.figures),
        }

    def earnings(self) -> dict[str, Any]:
        leases = self.leases()
        hub_balance = None
        with contextlib.suppress(MarketRefused, MarketUnreachable):
            hub_balance = self.connector.paid()
        return {
            "market": self.market,
            "earned_by_our_count": sum(lease["earned"] for lease in leases),
            "paid_by_the_hub": hub_balance,
            "gpu_seconds_reported": round(sum(lease["usage_gpu_seconds"] for lease in leases), 3),
            "leases": len(leases),
        }
