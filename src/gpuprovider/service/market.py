"""The provider's side of a market (the reference hub, or a push market such as Swan):
register, price and bid on orders, realise won leases as tasks or services, report
their state and signed, hash-chained usage, and close them.

Every change to a lease is a transition of the lease machine (`lifecycle/leases.py`) in
one transaction with what it causes: a win is recorded, its task submitted and the
lease provisioning, or none of it; the lease hears its task's transitions through its
owner hook, so nothing here polls tasks. What must reach the market (state, usage) is
sent by `report`, woken by the lease's changes, one lease at a time: a lease the market
refuses or cannot take is retried with backoff, never holding the others back.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from gpuprovider.domain.records import OwnerKind, TokenRecord
from gpuprovider.domain.spec import TaskSpec
from gpuprovider.identity.keys import public_key_hex
from gpuprovider.lifecycle import leases as lifecycle
from gpuprovider.market.client import Event, MarketRefused, MarketUnreachable
from gpuprovider.market.connector import Connector
from gpuprovider.market.model import (
    LIVE,
    Action,
    Cause,
    CloseReason,
    Decision,
    LeaseRecord,
    LeaseState,
    Order,
    Reported,
    fmt_money,
    market_tenant,
)
from gpuprovider.market.pricing import PricingPolicy, Quote, Unpriceable
from gpuprovider.market.strategies import builtin
from gpuprovider.market.strategy import (
    LeaseView,
    Mode,
    Outcome,
    Situation,
    Strategy,
    decide_safely,
    observe_safely,
)
from gpuprovider.market.usage import Usage, UsageError, check_sealed, genesis, seal
from gpuprovider.service.errors import ServiceError
from gpuprovider.service.placement import task_request
from gpuprovider.service.tasks import TaskService
from gpuprovider.service.tokens import TokenService
from gpuprovider.store.store import Store, Tx

log = logging.getLogger(__name__)
L = LeaseState
REPORTED = {L.PROVISIONING: Reported.PROVISIONING, L.RUNNING: Reported.RUNNING}
BACKOFF_S = 1.0  # a lease whose report failed is tried again after 1 s, 2 s, 4 s ...
BACKOFF_MAX_S = 300.0
REPORT_IDLE_S = 5.0  # the reporter looks again at least this often


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
    strategy: str = ""  # [market.<name>] strategy; "": the built-in rule


@dataclass
class Retry:
    """A lease whose report failed: when to try again, and how many times it has."""

    failures: int = 0
    at: float = 0.0
    last_error: str = ""


@dataclass
class Figures:
    orders: int = 0
    bids: int = 0
    declined: int = 0
    won: int = 0
    lost: int = 0
    report_errors: int = 0  # reports the market refused, could not take, or answered badly
    retrying: dict[str, Retry] = field(default_factory=dict)  # lease id -> its backoff


def lease_spec(
    lease_id: str, order: Order, model: str, priority: int, market: str, renewable: bool = False
) -> TaskSpec:
    """The task that realises a lease: the tenant's payload, with the order's resources,
    duration and the market's priority (the payload cannot raise or lower them). A
    renewable lease's task has no deadline of its own: `expire` ends it on time."""
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
        strategy: Strategy | None = None,
    ):
        self.store, self.tasks, self.tokens, self.key = store, tasks, tokens, key
        self.pricing, self.settings = pricing, settings
        self.strategy = strategy  # None: the built-in rule in `decide`
        self._builtin = builtin()
        self.market = settings.name
        self.connector = connector
        self.who = TokenRecord(
            id=f"market:{self.market}",
            name=f"market:{self.market}",
            scopes=["read", "submit"],
            tenant=market_tenant(self.market),
            created_at=time.time(),
        )
        self.registered = False
        self.figures = Figures()
        self.standing: dict[str, Any] = {}  # the market's view of this provider, last heard
        self._public_key = public_key_hex(key)
        self._reporting = threading.Lock()  # one report pass at a time

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
        log.info("market %s: registered as %s", self.market, self.settings.provider_name)
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
                self._observe(str(event.data["lease_id"]), won=True)
            elif event.kind == "lost":
                self._lost(str(event.data["order_id"]), "another provider won")
                self._observe(str(event.data["order_id"]), won=False)
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
            return Decision(Action.DECLINE, f"no {wanted} here", cause=Cause.NO_MODEL), ""
        # a payload still to come is judged by its resources alone
        probe = (
            order if order.payload else order.model_copy(update={"payload": {"command": ["true"]}})
        )
        if self.strategy is not None:
            return self._decide_by_strategy(order, probe, models, mode)
        cause = Cause.CAPACITY
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
                cause = Cause.UNPRICEABLE
            except ValidationError as exc:
                why = f"payload is not a task spec: {exc.errors()[0]['msg']}"
                return Decision(Action.DECLINE, why, cause=Cause.PAYLOAD), ""
            except ServiceError as exc:  # a payload this provider cannot run (an image)
                return Decision(Action.DECLINE, str(exc), cause=Cause.PAYLOAD), ""
        if not quotes:
            return Decision(Action.DECLINE, "; ".join(reasons) or "cannot run it", cause=cause), ""
        quote, model = min(quotes, key=lambda q: q[0].price_per_hour)
        if quote.price_per_hour > order.max_price_per_hour:
            return Decision(
                Action.DECLINE,
                f"our price {quote.price_per_hour} is above the cap {order.max_price_per_hour} "
                f"micros per hour ({quote.explain()})",
                cause=Cause.PRICE,
            ), model
        action = Action.BID if mode == "auction" else Action.ACCEPT
        expires = time.time() + self.settings.bid_valid_s
        return Decision(action, quote.explain(), quote.price_per_hour, expires), model

    def _decide_by_strategy(
        self, order: Order, probe: Order, models: list[str], mode: str
    ) -> tuple[Decision, str]:
        """The configured strategy's answer, from what this provider knows now: each of
        its models the order fits on (placed by its own scheduler, now or once its
        preemptible work gave way), the built-in quote on each, its live leases. A
        strategy that raises or answers what the market would refuse is replaced by the
        built-in rule for this order, and the reason (the lease's journal row) says so."""
        assert self.strategy is not None
        requests, quotes, later = {}, {}, {}
        for model in models:
            try:
                spec = lease_spec(order.id, probe, model, self.settings.priority, self.market)
                later[model] = self.tasks.placeable(spec)[1]
            except ValidationError as exc:
                why = f"payload is not a task spec: {exc.errors()[0]['msg']}"
                return Decision(Action.DECLINE, why, cause=Cause.PAYLOAD), ""
            except ServiceError as exc:
                return Decision(Action.DECLINE, str(exc), cause=Cause.PAYLOAD), ""
            requests[model] = task_request(f"lease-{order.id}", spec)
            quote: Quote | Unpriceable
            try:
                quote = self.pricing.quote(order, model or "cpu")
            except Unpriceable as exc:
                quote = exc
            quotes[model] = quote
        options, cluster = self.tasks.probe(requests, quotes, later)
        situation = Situation(order, time.time(), options, cluster, self._lease_views(), Mode(mode))
        choice = decide_safely(self.strategy, situation, self._builtin)
        decision = choice.decision
        if choice.bids:  # valid as long as this market's bids are
            decision = replace(decision, expires_at=time.time() + self.settings.bid_valid_s)
        return decision, choice.model

    def _lease_views(self) -> list[LeaseView]:
        with self.store.read() as r:
            live = r.market.list(self.market, {L.PROVISIONING, L.RUNNING})
        views = []
        for lease in live:
            started = lease.running_since or lease.created_at
            duration = float(lease.order.get("duration_s") or 0)
            gpus = float((lease.order.get("resources") or {}).get("gpus", 1))
            views.append(
                LeaseView(
                    lease.id, lease.model, gpus, lease.price_per_hour, started, started + duration
                )
            )
        return views

    def _observe(self, lease_id: str, won: bool) -> None:
        """Tell the strategy what became of its bid."""
        if self.strategy is None:
            return
        with self.store.read() as r:
            lease = r.market.get(lease_id)
        if lease is not None:
            observe_safely(self.strategy, Outcome(lease_id, won, lease.price_per_hour, time.time()))

    def on_order(self, data: dict[str, Any]) -> None:
        """An order from the hub: decided, recorded (bidding, or lost when declined),
        then answered; a lease the hub would not take the answer of expires."""
        order = Order.model_validate(data["order"])
        mode = str(data.get("mode", "auction"))
        self.figures.orders += 1
        with self.store.read() as r:
            if r.market.get(order.id):
                return  # seen before (a resumed stream)
        decision, model = self.decide(order, mode)
        declined = decision.action == Action.DECLINE
        with self.store.tx() as tx:
            tx.market.add(
                order.id,
                self.market,
                L.LOST if declined else L.BIDDING,
                order.model_dump(),
                f"declined: {decision.reason}" if declined else f"bid: {decision.reason}",
                model=model,
                price_per_hour=decision.price_per_hour,
            )
        try:
            self.connector.respond(order.id, mode, decision)
            if declined:
                self.figures.declined += 1
            else:
                self.figures.bids += 1
        except (MarketRefused, MarketUnreachable) as exc:
            with self.store.tx() as tx:
                lease = tx.market.get(order.id)
                if lease and lease.state == L.BIDDING:
                    lifecycle.transition(tx, lease, L.EXPIRED, f"the hub refused the bid: {exc}")

    def _lost(self, lease_id: str, why: str) -> None:
        with self.store.tx() as tx:
            lease = tx.market.get(lease_id)
            if lease and lease.state in (L.OFFERED, L.BIDDING):
                lifecycle.transition(tx, lease, L.LOST, why, reason=why)
                self.figures.lost += 1

    def on_won(self, lease_id: str, price: int, raw_order: dict[str, Any]) -> None:
        """Run a won lease, in one transaction: the lease won, its task submitted and
        the lease provisioning, or none of it (the event is read again after a crash).
        The order is run as this provider priced it (its row, written before the bid
        went out), at no less than its price. A win it never bid on, one it declined,
        or one below its price is refused: recorded lost, and reported closed."""
        with self.store.tx() as tx:
            lease = tx.market.get(lease_id)
            if lease is None:
                order = Order.model_validate(raw_order).model_copy(update={"id": lease_id})
                tx.market.add(
                    lease_id,
                    self.market,
                    L.LOST,
                    order.model_dump(),
                    "refused the win: this provider never bid on it",
                    reported=Reported.REFUSE.value,
                )
                return
            if lease.state == L.LOST and lease.reported in (Reported.NOTHING, ""):
                tx.market.update(lease, reported=Reported.REFUSE.value)
                tx.market.note(
                    lease, f"refused the win: this provider declined it ({lease.reason})"
                )
                return
            if lease.state not in (L.OFFERED, L.BIDDING):
                return  # a repeated event
            if price < lease.price_per_hour:
                why = f"refused the win: won at {price}, below this provider's price"
                lifecycle.transition(tx, lease, L.LOST, why, reported=Reported.REFUSE.value)
                return
            self.figures.won += 1
            self.start_won(tx, lease, price)
        log.info("market %s: lease %s won at %s/h", self.market, lease_id, fmt_money(price))

    def start_won(self, tx: Tx, lease: LeaseRecord, price: int) -> None:
        """Win `lease` at `price` and start its work, in the caller's transaction."""
        order = lease.spec  # not the market's copy: what was priced
        lifecycle.transition(tx, lease, L.WON, f"won at {price}", price_per_hour=price)
        if order.payload is None:
            lifecycle.transition(tx, lease, L.AWAITING_PAYLOAD, "its payload is to come")
            return
        model = lease.model or self._any_model(order)
        try:
            spec = lease_spec(
                lease.id,
                order,
                model,
                self.settings.priority,
                self.market,
                renewable=self.connector.pushes,
            )
            self.tasks.check_runnable(spec, tx)
        except (ValidationError, ServiceError) as exc:
            lifecycle.close(tx, lease, CloseReason.FAILED, f"could not start: {exc}")
            return
        task, _ = self.tasks.submit_in(
            tx, spec, self.who.tenant, idempotency_key=lease.id, owner=(OwnerKind.LEASE, lease.id)
        )
        endpoint = ""
        if task.service_id:
            service = tx.services.get(task.service_id)
            if service is not None:
                endpoint = self.tasks.serving.gateway.urls(service.name)[0]
        lifecycle.transition(
            tx,
            lease,
            L.PROVISIONING,
            f"task {task.id} submitted",
            task_id=task.id,
            service_id=task.service_id,
            endpoint=endpoint,
        )

    def accept_pushed(self, order: Order) -> tuple[Decision, LeaseRecord | None]:
        """An order a push market sends (Swan): decided, and if accepted won and started,
        in one transaction (a refused one leaves a lost lease saying why). None for the
        lease when another request made it first."""
        self.figures.orders += 1
        decision, model = self.decide(order, "dispatch")
        with self.store.tx() as tx:
            if tx.market.get(order.id):
                return decision, None
            if decision.action != Action.ACCEPT:
                tx.market.add(
                    order.id,
                    self.market,
                    L.LOST,
                    order.model_dump(),
                    f"declined: {decision.reason}",
                    model=model,
                )
                self.figures.declined += 1
                return decision, tx.market.get(order.id)
            lease = tx.market.add(
                order.id,
                self.market,
                L.OFFERED,
                order.model_dump(),
                f"accepted: {decision.reason}",
                model=model,
                price_per_hour=decision.price_per_hour,
            )
            self.figures.won += 1
            self.start_won(tx, lease, decision.price_per_hour)
            return decision, tx.market.get(order.id)

    def _any_model(self, order: Order) -> str:
        with self.store.read() as r:
            ours = {g.model for n in r.nodes.list() for g in n.gpus if g.present}
        fits = sorted(m for m in ours if order.resources.accepts(m))
        return fits[0] if fits else "0"

    def on_close(self, lease_id: str, reason: str) -> None:
        """The market ends the lease: it stops its work and closes once that stopped."""
        why = CloseReason(reason)
        with self.store.tx() as tx:
            lease = tx.market.get(lease_id)
            if lease is not None and lease.state in LIVE:
                lifecycle.close(tx, lease, why, f"closed by the market: {why}")

    # -- what time decides ----------------------------------------------------------

    def expire(self, now: float | None = None) -> None:
        """Leases whose time ran out here: a payload that never came, and a push
        market's lease past its duration (the market does not end those itself)."""
        now = now or time.time()
        with self.store.read() as r:
            live = r.market.list(self.market, {L.AWAITING_PAYLOAD, L.PROVISIONING, L.RUNNING})
        for lease in live:
            order = lease.spec
            why: tuple[CloseReason, str] | None = None
            if lease.state == L.AWAITING_PAYLOAD:
                if now - lease.created_at > order.payload_timeout_s:
                    why = CloseReason.PAYLOAD_TIMEOUT, "the payload never came"
            elif self.connector.pushes:
                since = lease.running_since or lease.created_at
                if now - since > order.duration_s:
                    why = CloseReason.EXPIRED, "its duration ran out"
            if why is None:
                continue
            with self.store.tx() as tx:
                current = tx.market.get(lease.id)
                if current is not None and current.state == lease.state:
                    lifecycle.close(tx, current, *why)

    def beat(self) -> None:
        """Tell the hub this provider is alive (its own thread: nothing slow delays it).
        A hub that forgot this provider (restarted on an empty store, or it was
        removed) is joined again at once."""
        if not self.registered:
            return
        try:
            self.standing = self.connector.beat()
        except MarketRefused as exc:
            log.warning("market %s: heartbeat refused: %s; registering again", self.market, exc)
            if exc.status in (401, 403, 404):
                self.registered = False
        except MarketUnreachable as exc:
            log.warning("market %s: heartbeat failed: %s", self.market, exc)

    # -- telling the market ---------------------------------------------------------

    def report(self, now: float | None = None) -> float:
        """Tell the market what changed, lease by lease: usage (up to now, or to the
        end), then the state. A lease whose report fails is tried again with backoff
        and never holds the others back. How soon the next pass is due."""
        now = now or time.time()
        with self._reporting:
            with self.store.read() as r:
                pending = r.market.to_report(self.market)
            retrying = self.figures.retrying
            for gone in set(retrying) - {lease.id for lease in pending}:
                retrying.pop(gone, None)
            soon = REPORT_IDLE_S
            for lease in pending:
                retry = retrying.get(lease.id)
                if retry and retry.at > now:
                    soon = min(soon, retry.at - now)
                    continue
                try:
                    self._report_one(lease, now)
                    retrying.pop(lease.id, None)
                except Exception as exc:  # one lease's trouble is that lease's alone
                    self._failed(lease, exc, now)
                if lease.running_since is not None and lease.state == L.RUNNING:
                    due = (
                        lease.usage_until or lease.running_since
                    ) + self.settings.usage_interval_s
                    soon = min(soon, max(due - now, 0.05))
            return soon

    def _failed(self, lease: LeaseRecord, exc: Exception, now: float) -> None:
        retry = self.figures.retrying.setdefault(lease.id, Retry())
        retry.failures += 1
        retry.at = now + min(BACKOFF_S * 2 ** (retry.failures - 1), BACKOFF_MAX_S)
        retry.last_error = f"{type(exc).__name__}: {exc}"[:500]
        self.figures.report_errors += 1
        if isinstance(exc, MarketUnreachable):
            log.warning("market %s: lease %s not reported: %s", self.market, lease.id, exc)
        elif isinstance(exc, MarketRefused):
            log.warning(
                "market %s: the market refused lease %s's report: %s", self.market, lease.id, exc
            )
        else:
            log.exception("market %s: reporting lease %s failed", self.market, lease.id)

    def _report_one(self, lease: LeaseRecord, now: float) -> None:
        try:
            self._tell(lease, now)
        except MarketRefused as exc:
            if not self._reconcile(lease, exc):
                raise

    def _tell(self, lease: LeaseRecord, now: float) -> None:
        if lease.reported == Reported.REFUSE:
            self.connector.report_state(
                lease.id, "closed", reason=CloseReason.FAILED.value, detail=lease.reason[:1000]
            )
            self._set_reported(lease, Reported.CLOSED, "the market was told the win is refused")
            return
        if lease.running_since is not None:
            self._send_usage(lease, now)
        if lease.state == L.CLOSED:
            wanted = Reported.CLOSED
        else:
            wanted = REPORTED.get(lease.state, Reported.NOTHING)
        if wanted in (Reported.NOTHING, lease.reported):
            return
        details: dict[str, Any] = {}
        if wanted == Reported.RUNNING:
            details["endpoint"] = lease.endpoint
            if lease.service_id:  # the tenant calls its service with this, and only that
                details["access_token"] = self._access_token(lease)
        if wanted == Reported.CLOSED:
            details |= {
                "reason": lease.close_reason or CloseReason.FAILED.value,
                "detail": lease.reason[:1000],
                "ended_at": lease.ended_at,
                "log_tail": self._log_tail(lease),
            }
        answer = self.connector.report_state(lease.id, wanted.value, **details)
        if wanted == Reported.CLOSED:
            self._revoke_access(lease)
        with self.store.tx() as tx:
            current = tx.market.get(lease.id)
            if current is None:
                return
            changes: dict[str, Any] = {"reported": wanted.value}
            if wanted == Reported.RUNNING:  # the market bills from when it heard: so do we
                heard = answer.get("running_at")
                if not (isinstance(heard, int | float) and abs(heard - now) < 3600):
                    heard = now
                changes["running_since"] = float(heard)
            tx.market.update(current, **changes)
            tx.market.note(current, f"reported {wanted.value} to the market")
        said = f" ({lease.close_reason}: {lease.reason[:200]})" if wanted == Reported.CLOSED else ""
        log.info("market %s: lease %s reported %s%s", self.market, lease.id, wanted.value, said)
        lease.reported = wanted.value

    def _access_prefix(self, lease: LeaseRecord) -> str:
        return f"lease-{lease.id}"[:56] + "-"

    def _access_token(self, lease: LeaseRecord) -> str:
        """A token for the lease's tenant that calls the lease's service and nothing
        else (scope service:<name>); shown once (a new one when asked again), revoked
        when the lease closes."""
        with self.store.read() as r:
            service = r.services.get(lease.service_id or "")
        if service is None:
            return ""
        self._revoke_access(lease)
        name = self._access_prefix(lease) + secrets.token_hex(3)
        made = self.tokens.create(name, [f"service:{service.name}"], tenant=self.who.tenant)
        return str(made["token"])

    def _revoke_access(self, lease: LeaseRecord) -> None:
        prefix = self._access_prefix(lease)
        for token in self.tokens.list():
            if token["name"].startswith(prefix) and token["revoked_at"] is None:
                self.tokens.revoke(token["name"])

    def _log_tail(self, lease: LeaseRecord, limit: int = 4096) -> str:
        """The end of the lease's work's output, for its tenant to see why it ended."""
        if not lease.task_id:
            return ""
        try:
            return self.tasks.tail(lease.task_id, limit)
        except ServiceError:
            return ""

    def _set_reported(self, lease: LeaseRecord, reported: Reported, why: str) -> None:
        with self.store.tx() as tx:
            current = tx.market.get(lease.id)
            if current is not None:
                tx.market.update(current, reported=reported.value)
                tx.market.note(current, why)
        lease.reported = reported.value

    def _send_usage(self, lease: LeaseRecord, now: float) -> None:
        start = lease.usage_until or lease.running_since
        assert start is not None
        end = min(now, lease.ended_at or now)
        final = lease.ended_at is not None
        if end <= start or (not final and end - start < self.settings.usage_interval_s):
            return
        order = lease.spec
        seconds = end - start
        mark, requests = self._requests(lease)
        record = seal(
            self.key,
            Usage(
                lease_id=lease.id,
                seq=lease.usage_seq + 1,
                start=start,
                end=end,
                gpu_seconds={lease.model or "cpu": order.resources.gpus * seconds},
                cpu_seconds=order.resources.cpus * seconds,
                memory_gib_seconds=order.resources.memory_gb * seconds,
                requests=requests,
                prev=lease.usage_hash or genesis(lease.id),
            ),
        )
        self.connector.report_usage(record)
        self._record_usage(lease, record, requests, mark)
        log.info(
            "market %s: lease %s usage record %d sent (%.0f s)",
            self.market,
            lease.id,
            record.seq,
            record.end - record.start,
        )

    def _record_usage(self, lease: LeaseRecord, record: Usage, requests: int, mark: str) -> None:
        gpu_seconds = sum(record.gpu_seconds.values())
        with self.store.tx() as tx:
            current = tx.market.get(lease.id)
            if current is None:
                return
            changes = dict(
                usage_seq=record.seq,
                usage_hash=record.hash,
                usage_until=record.end,
                usage_gpu_seconds=current.usage_gpu_seconds + gpu_seconds,
                usage_requests=current.usage_requests + requests,
                requests_mark=mark or current.requests_mark,
            )
            tx.market.update(current, **changes)
        for key, value in changes.items():
            setattr(lease, key, value)

    def _reconcile(self, lease: LeaseRecord, refused: MarketRefused) -> bool:
        """The market refused a report: catch up with what it holds. It says the last
        usage record it holds (our own, signed: we take it as sent, and go on from it),
        or that the lease is over there (we close it with that reason, and send no more
        usage). False when it says neither: the report is retried with backoff."""
        held = refused.details.get("held")
        if isinstance(held, dict):
            try:
                record = Usage.model_validate(held)
                check_sealed(record, self._public_key)
            except (ValidationError, UsageError) as exc:
                log.warning(
                    "market %s: lease %s: the record the market holds is not ours: %s",
                    self.market,
                    lease.id,
                    exc,
                )
                return False
            if record.lease_id == lease.id and record.seq > lease.usage_seq:
                log.warning(
                    "market %s: lease %s: the market holds usage to record %d; going on from it",
                    self.market,
                    lease.id,
                    record.seq,
                )
                self._record_usage(lease, record, record.requests, "")
                return True
        state = refused.details.get("lease_state")
        forgotten = refused.status == 404  # the market does not know it (any more)
        if state == L.CLOSED.value or forgotten:
            why = CloseReason.LOST
            with contextlib.suppress(ValueError):
                why = CloseReason(refused.details.get("close_reason") or why)
            with self.store.tx() as tx:
                current = tx.market.get(lease.id)
                if current is not None:
                    if current.state in LIVE:
                        lifecycle.close(tx, current, why, f"the market closed it: {refused}")
                    # no more usage for a lease the market ended: its last record stands
                    tx.market.update(current, usage_until=current.ended_at or current.usage_until)
                    if current.state in (L.CLOSED, L.LOST):
                        tx.market.update(current, reported=Reported.CLOSED.value)
                    said = "does not know it" if forgotten else f"holds it closed ({why})"
                    tx.market.note(current, f"the market {said}")
            lease.reported = Reported.CLOSED.value
            return True
        return False

    def _requests(self, lease: LeaseRecord) -> tuple[str, int]:
        """(the gateway's count now, requests since the lease's last record) for a
        service lease. Each lease has a service of its own, so all the router passed to
        it is the lease's; a router that restarted counts again from zero (what it
        passed between the last record and its end goes uncounted, never twice)."""
        if not lease.service_id:
            return lease.requests_mark, 0
        with self.store.read() as r:
            service = r.services.get(lease.service_id)
        seen = self.tasks.serving.served(service.name) if service else None
        if seen is None:
            return lease.requests_mark, 0
        started, total = seen
        before, _, counted = lease.requests_mark.partition(":")
        same_router = before == f"{started:.6f}" and int(counted or 0) <= total
        return f"{started:.6f}:{total}", total - int(counted) if same_router else total

    def renew(self, lease_id: str, extra_s: int) -> dict[str, Any] | None:
        """Lengthen a live lease by `extra_s` (a push market's renewal); None when there
        is no such lease or it is over. The order stays valid: at most a year in all."""
        with self.store.tx() as tx:
            lease = tx.market.get(lease_id)
            if lease is None or lease.state not in LIVE - {L.CLOSING}:
                return None
            order = Order.model_validate(
                lease.order | {"duration_s": lease.order["duration_s"] + extra_s}
            )
            tx.market.update(lease, order=order.model_dump())
            tx.market.note(lease, f"renewed for {extra_s} s more")
        return self.lease(lease_id)

    def labelled(self, key: str, value: str) -> str | None:
        """The newest lease whose payload carries label `key`=`value`."""
        with self.store.read() as r:
            rows = r.market.list(self.market)
        for lease in reversed(rows):
            labels = (lease.order.get("payload") or {}).get("labels") or {}
            if labels.get(key) == value:
                return lease.id
        return None

    # -- views ----------------------------------------------------------------------

    def lease(self, lease_id: str) -> dict[str, Any] | None:
        with self.store.read() as r:
            lease = r.market.get(lease_id)
        return self._view(lease) if lease and lease.market == self.market else None

    def leases(self, limit: int | None = None) -> list[dict[str, Any]]:
        with self.store.read() as r:
            rows = r.market.list(self.market, limit=limit)
        return [self._view(lease) for lease in rows]

    def _view(self, lease: LeaseRecord) -> dict[str, Any]:
        order = lease.order
        return {
            "id": lease.id,
            "market": lease.market,
            "state": lease.state.value,
            "model": lease.model,
            "gpus": order["resources"]["gpus"],
            "price_per_hour": lease.price_per_hour,
            "duration_s": order["duration_s"],
            "earned": lease.earned(time.time()),
            "task_id": lease.task_id,
            "service_id": lease.service_id,
            "endpoint": lease.endpoint,
            "close_reason": lease.close_reason,
            "reason": lease.reason,
            "reported": lease.reported,
            "usage_records": lease.usage_seq,
            "usage_gpu_seconds": round(lease.usage_gpu_seconds, 3),
            "usage_requests": lease.usage_requests,
        }

    def status(self) -> dict[str, Any]:
        cursor = self.cursor()
        with self.store.read() as r:
            rows = r.market.list(self.market)
        by_state: dict[str, int] = {}
        for lease in rows:
            by_state[lease.state.value] = by_state.get(lease.state.value, 0) + 1
        figures = self.figures
        standing = self.standing
        return {
            "market": self.market,
            "url": self.settings.url,
            "status": cursor["status"] or "not registered",
            "status_reason": cursor["status_reason"],
            "last_event": cursor["last_event"],
            # as the market computes it, from its last answer to a heartbeat
            "reliability": standing.get("reliability"),
            "reliability_floor": standing.get("reliability_floor"),
            "leases": by_state,
            "figures": {
                "orders": figures.orders,
                "bids": figures.bids,
                "declined": figures.declined,
                "won": figures.won,
                "lost": figures.lost,
                "report_errors": figures.report_errors,
                "leases_retrying": len(figures.retrying),
            },
        }

    def earnings(self) -> dict[str, Any]:
        now = time.time()
        with self.store.read() as r:
            rows = r.market.list(self.market)
        hub_balance = None
        with contextlib.suppress(MarketRefused, MarketUnreachable):
            hub_balance = self.connector.paid()
        return {
            "market": self.market,
            "earned_by_our_count": sum(lease.earned(now) for lease in rows),
            "paid_by_the_hub": hub_balance,
            "gpu_seconds_reported": round(sum(lease.usage_gpu_seconds for lease in rows), 3),
            "leases": len(rows),
        }
