"""The reference hub's rules: who may take part, how orders are matched, how money
moves. Every method is one transaction; participants, orders and leases change state
only through their machines (`hub/lifecycle.py`), each change a row of the hub's
journal. The loop (`tick`) decides auctions and dispatches, accrues escrow to providers
each second and closes leases whose deposit ran out, whose time is up or whose
provider went silent."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.engine import Connection

from gpuprovider.hub import lifecycle
from gpuprovider.hub import store as t
from gpuprovider.hub.lifecycle import LEASES, ORDERS, PARTICIPANTS
from gpuprovider.hub.money import accrue
from gpuprovider.hub.records import (
    HubLease,
    HubOrder,
    OrderState,
    Participant,
    ParticipantKind,
    ParticipantStatus,
)
from gpuprovider.hub.store import HubStore, balance, emit, new_id, post, write_journal
from gpuprovider.lifecycle.kernel import IllegalTransition
from gpuprovider.market.model import (
    EXTERNAL,
    MAX_MONEY,
    CloseReason,
    LeaseState,
    Order,
    Transfer,
    escrow_account,
    provider_account,
    tenant_account,
)
from gpuprovider.market.usage import Usage, UsageError, check_next
from gpuprovider.proof.remote import AttestMode, RemoteError, RemoteVerifier

log = logging.getLogger(__name__)
L = LeaseState
P = ParticipantStatus


class HubError(Exception):
    status = 422

    def __init__(self, message: str, **details: Any):
        super().__init__(message)
        self.details = details


class BadRequest(HubError):
    status = 400


class NotAllowed(HubError):
    status = 403


class Missing(HubError):
    status = 404


class Clash(HubError):
    status = 409


@dataclass
class HubSettings:
    auction_window_s: float = 2.0  # bids are collected this long
    dispatch_timeout_s: float = 10.0  # a dispatched provider answers within this
    reliability_floor: float = 0.5
    heartbeat_s: float = 10.0  # providers beat this often; see silent_after_s
    close_grace_s: float = 30.0  # a provider confirms a close within this
    start_timeout_s: float = 900.0  # a won lease runs within this, or closes as failed
    rechallenge_s: float = 3600.0  # mean time between random re-proofs of a provider
    allow_simulated: bool = False  # admit providers proving simulated GPUs (tests, demos)
    # time real GPUs of unmeasured models against published bandwidth (proof/calibration.py)
    allow_estimated_calibration: bool = False

    @property
    def silent_after_s(self) -> float:
        """A provider this long without a beat is not matched, and its leases are lost."""
        return max(3 * self.heartbeat_s, 10.0)


class _Body(BaseModel):
    # strict: a string or a boolean is not a number, and nothing unknown is taken
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class ProviderIn(_Body):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    api_url: Annotated[str, Field(max_length=512, pattern=r"^https?://")]
    verify_token: Annotated[str, Field(min_length=1, max_length=256)]


class TenantIn(_Body):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class OrderIn(_Body):
    order: dict[str, Any]  # an Order without its id (the hub names it)
    mode: Literal["auction", "dispatch"] = "auction"
    deposit: Annotated[int, Field(gt=0, le=MAX_MONEY)]  # micros


class BidIn(_Body):
    price_per_hour: Annotated[int, Field(gt=0, le=MAX_MONEY)]
    valid_s: Annotated[float, Field(gt=0, le=3600)] = 60.0


class DispatchIn(_Body):
    accept: bool
    price_per_hour: Annotated[int, Field(ge=0, le=MAX_MONEY)] = 0
    reason: Annotated[str, Field(max_length=500)] = ""


class LeaseStateIn(_Body):
    state: Literal["provisioning", "running", "closed"]
    reason: Annotated[CloseReason | None, Field(strict=False)] = None  # by its value
    detail: Annotated[str, Field(max_length=1000)] = ""
    endpoint: Annotated[str, Field(max_length=512)] = ""
    # for the tenant alone: a token that calls the lease's service
    access_token: Annotated[str, Field(max_length=256)] = ""
    log_tail: Annotated[str, Field(max_length=8192)] = ""  # the end of the work's output
    ended_at: Annotated[float, Field(ge=0, le=1e11)] | None = None  # billing ends there


class DepositIn(_Body):
    tenant: Annotated[str, Field(min_length=1, max_length=64)]  # name or key
    amount: Annotated[int, Field(gt=0, le=MAX_MONEY)]


def parse(model: type[BaseModel], raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise HubError("body: a JSON object is expected")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "body"
        raise HubError(f"{where}: {error['msg']}") from None


class Hub:
    def __init__(self, store: HubStore, settings: HubSettings, verifier_key: Ed25519PrivateKey):
        self.store, self.settings, self.verifier_key = store, settings, verifier_key

    def started(self) -> None:
        """After the hub was down, providers could not beat: count their silence from
        now, so no lease is closed as lost for the hub's own outage."""
        with self.store.tx() as conn:
            conn.execute(
                update(t.participants)
                .where(t.participants.c.kind == ParticipantKind.PROVIDER.value)
                .values(last_heartbeat=time.time())
            )

    # -- who takes part -----------------------------------------------------------------

    def participant(self, conn: Connection, key: str, kind: ParticipantKind) -> Participant:
        row = conn.execute(select(t.participants).where(t.participants.c.key == key)).first()
        if row is None or row.kind != kind.value:
            raise NotAllowed(f"no {kind} registered with this key; register first")
        return Participant.of(row)

    def require(self, key: str, kind: ParticipantKind) -> Participant:
        """NotAllowed unless `key` is a registered `kind`: checked before a body is read."""
        with self.store.read() as conn:
            return self.participant(conn, key, kind)

    def register(self, key: str, kind: str, raw: Any) -> dict[str, Any]:
        who = ParticipantKind(kind)
        body = parse(ProviderIn if who == ParticipantKind.PROVIDER else TenantIn, raw)
        now = time.time()
        with self.store.tx() as conn:
            existing = conn.execute(
                select(t.participants).where(t.participants.c.key == key)
            ).first()
            if existing is not None and existing.kind != who.value:
                raise Clash(f"this key is registered as a {existing.kind}")
            taken = conn.execute(
                select(t.participants.c.key).where(
                    t.participants.c.kind == who.value,
                    t.participants.c.name == body.name,
                    t.participants.c.key != key,
                )
            ).first()
            if taken:
                raise Clash(f"another {who} is registered as {body.name!r}")
            values: dict[str, Any] = {"name": body.name}
            if who == ParticipantKind.PROVIDER:
                values |= {
                    "api_url": body.api_url.rstrip("/"),
                    "verify_token": body.verify_token,
                    "last_heartbeat": now,
                }
            if existing is None:
                status = P.PENDING if who == ParticipantKind.PROVIDER else P.ADMITTED
                why = "waiting for proof of GPU" if status == P.PENDING else "registered"
                conn.execute(
                    t.participants.insert().values(
                        key=key,
                        kind=who.value,
                        registered_at=now,
                        gpus=[],
                        status=status.value,
                        status_reason=why,
                        **values,
                    )
                )
                write_journal(conn, "participant", key, key, None, status.value, why)
            else:
                conn.execute(
                    update(t.participants).where(t.participants.c.key == key).values(**values)
                )
                current = Participant.of(existing)
                if who == ParticipantKind.PROVIDER and current.status != P.PENDING:
                    why = "registered again: waiting for proof of GPU"
                    PARTICIPANTS.transition(conn, current, P.PENDING, why)
        return self.describe(key)

    def describe(self, key: str) -> dict[str, Any]:
        with self.store.read() as conn:
            row = conn.execute(select(t.participants).where(t.participants.c.key == key)).first()
            if row is None:
                raise Missing("no participant with this key")
            who = Participant.of(row)
            return {
                "key": who.key,
                "kind": who.kind.value,
                "name": who.name,
                "status": who.status.value,
                "status_reason": who.status_reason,
                "gpus": who.gpus,
                "reliability": round(who.reliability, 3),
                "reliability_floor": self.settings.reliability_floor,
                "leases_completed": who.completed,
                "leases_failed": who.failed,
                "balance": balance(
                    conn,
                    provider_account(who.key)
                    if who.kind == ParticipantKind.PROVIDER
                    else tenant_account(who.key),
                ),
            }

    def admit(self, key: str) -> dict[str, Any]:
        """Prove every GPU of a provider (blocking: the app runs it on a thread). Admitted
        only if every GPU passes, with a real (or, when allowed, simulated) verdict."""
        row = self.require(key, ParticipantKind.PROVIDER)
        verifier = RemoteVerifier(
            row.api_url,
            row.verify_token,
            key,
            self.verifier_key,
            allow_estimated=self.settings.allow_estimated_calibration,
            attest=AttestMode.TRY,  # recorded per GPU; orders may require it
        )
        try:
            uuids = verifier.gpus()
            outcomes = verifier.prove_all(uuids)
            problems = [
                f"{o.gpu_uuid}: {o.verdict.reason}" for o in outcomes if not o.verdict.passed
            ]
            if not outcomes:
                problems.append("it lists no GPU")
            if not self.settings.allow_simulated:
                problems += [
                    f"{o.gpu_uuid}: simulated (this hub admits real GPUs only; a demo hub "
                    "runs with --allow-simulated)"
                    for o in outcomes
                    if o.simulated
                ]
        except RemoteError as exc:
            outcomes, problems = [], [str(exc)]
        status = P.REFUSED if problems else P.ADMITTED
        reason = "; ".join(problems)[:2000] if problems else "every GPU proven"
        gpus = [
            {
                "uuid": o.gpu_uuid,
                "model": o.model,
                "attested": str(o.verdict.figures.get("attestation", "")).startswith("verified"),
            }
            for o in outcomes
            if o.verdict.passed
        ]
        with self.store.tx() as conn:
            current = self.participant(conn, key, ParticipantKind.PROVIDER)
            changes = {"gpus": gpus, "last_proof_at": time.time()}
            if current.status == status:  # proven again, as it was
                conn.execute(
                    update(t.participants)
                    .where(t.participants.c.key == key)
                    .values(status_reason=reason, **changes)
                )
                write_journal(conn, "participant", key, key, status.value, status.value, reason)
                emit(conn, key, "admission", {"status": status.value, "reason": reason})
            else:
                PARTICIPANTS.transition(conn, current, status, reason, **changes)
        log.info("provider %s %s: %s", row.name, status, reason)
        return self.describe(key)

    def due_for_proof(self, now: float, every_s: float, rng: Any = random) -> list[str]:
        """Admitted providers to re-challenge now, asked every `every_s`: at random
        times (a memoryless chance per call, so gaps are exponential with mean
        rechallenge_s, and a provider cannot tell when the next one comes), never within
        a tenth of that of the last proof, and only while no lease of theirs runs (a busy
        GPU cannot be proved)."""
        with self.store.read() as conn:
            rows = conn.execute(
                select(t.participants).where(
                    t.participants.c.kind == ParticipantKind.PROVIDER.value,
                    t.participants.c.status == P.ADMITTED.value,
                )
            ).all()
            busy = {
                r.provider
                for r in conn.execute(
                    select(t.leases.c.provider).where(t.leases.c.closed_at.is_(None))
                )
            }
        chance = 1 - math.exp(-every_s / self.settings.rechallenge_s)
        floor = self.settings.rechallenge_s / 10
        return [
            row.key
            for row in rows
            if row.key not in busy
            and row.last_proof_at is not None
            and now - row.last_proof_at >= floor
            and rng.random() < chance
        ]

    def heartbeat(self, key: str) -> dict[str, Any]:
        with self.store.tx() as conn:
            self.participant(conn, key, ParticipantKind.PROVIDER)
            conn.execute(
                update(t.participants)
                .where(t.participants.c.key == key)
                .values(last_heartbeat=time.time())
            )
        return self.describe(key)

    def deposit(self, raw: Any) -> dict[str, Any]:
        body = parse(DepositIn, raw)
        with self.store.tx() as conn:
            row = conn.execute(
                select(t.participants).where(
                    t.participants.c.kind == ParticipantKind.TENANT.value,
                    (t.participants.c.key == body.tenant) | (t.participants.c.name == body.tenant),
                )
            ).first()
            if row is None:
                raise Missing(f"no tenant {body.tenant!r}")
            post(
                conn,
                Transfer(new_id("dep"), EXTERNAL, tenant_account(row.key), body.amount, "deposit"),
            )
        return self.describe(row.key)

    # -- orders ---------------------------------------------------------------------

    def _candidates(
        self, conn: Connection, order: Order, now: float
    ) -> tuple[list[Participant], list[str]]:
        """Admitted, live, reliable providers with enough proven GPUs of a wanted model;
        and for each provider that is not, why not."""
        need = max(1, math.ceil(order.resources.gpus))
        rows = conn.execute(
            select(t.participants).where(t.participants.c.kind == ParticipantKind.PROVIDER.value)
        ).all()
        fit, why_not = [], []
        floor = self.settings.reliability_floor
        attested = " attested" if order.resources.attested else ""
        for row in map(Participant.of, rows):
            count = sum(
                1
                for g in row.gpus
                if order.resources.accepts(g["model"])
                and (g.get("attested") or not order.resources.attested)
            )
            if row.status != P.ADMITTED:
                why_not.append(f"{row.name}: {row.status} ({row.status_reason[:200]})")
            elif (order.resources.gpus or order.resources.attested) and count < need:
                model = order.resources.gpu_model or "any model"
                why_not.append(
                    f"{row.name}: {count} proven{attested} GPU(s) of {model}, {need} wanted"
                )
            elif (row.last_heartbeat or 0) < now - self.settings.silent_after_s:
                why_not.append(f"{row.name}: silent for {now - (row.last_heartbeat or 0):.0f} s")
            elif row.reliability < floor:
                why_not.append(
                    f"{row.name}: reliability {row.reliability:.2f} is below the floor "
                    f"{floor:g} ({row.failed} lease(s) failed by the provider, "
                    f"{row.completed} not)"
                )
            else:
                fit.append(row)
        return fit, why_not

    def post_order(self, tenant: str, raw: Any) -> dict[str, Any]:
        self.require(tenant, ParticipantKind.TENANT)
        body = parse(OrderIn, raw)
        order_id = new_id("ord")
        order = parse(Order, {**body.order, "id": order_id, "market": "hub"})
        now = time.time()
        with self.store.tx() as conn:
            self.participant(conn, tenant, ParticipantKind.TENANT)
            candidates, why_not = self._candidates(conn, order, now)
            if not candidates:
                reasons = "; ".join(why_not) or "no provider is registered"
                raise HubError(
                    f"no provider can run this order now ({reasons}); nothing was charged"
                )
            available = balance(conn, tenant_account(tenant))
            if body.deposit > available:
                raise HubError(
                    f"deposit {body.deposit} micros is more than your balance {available}"
                )
            post(
                conn,
                Transfer(
                    new_id("esc"),
                    tenant_account(tenant),
                    escrow_account(order_id),
                    body.deposit,
                    "order deposit",
                ),
            )
            dispatched = None
            if body.mode == "dispatch":
                dispatched = random.choice(candidates).key
                decide_at = now + self.settings.dispatch_timeout_s
            else:
                decide_at = now + self.settings.auction_window_s
            conn.execute(
                t.orders.insert().values(
                    id=order_id,
                    tenant=tenant,
                    spec=order.model_dump(),
                    mode=body.mode,
                    state=OrderState.OPEN.value,
                    deposit=body.deposit,
                    created_at=now,
                    decide_at=decide_at,
                    dispatched_to=dispatched,
                    refused_by=[],
                )
            )
            write_journal(conn, "order", order_id, tenant, None, "open", f"{body.mode} order")
            announce = {"order": order.model_dump(), "mode": body.mode, "decide_at": decide_at}
            for row in [r for r in candidates if r.key == dispatched] if dispatched else candidates:
                emit(conn, row.key, "order", announce)
        return self.order_view(order_id)

    def order_view(self, order_id: str) -> dict[str, Any]:
        with self.store.read() as conn:
            row = conn.execute(select(t.orders).where(t.orders.c.id == order_id)).first()
            if row is None:
                raise Missing(f"no order {order_id}")
            order = HubOrder.of(row)
            return {
                "id": order.id,
                "state": order.state.value,
                "mode": order.mode,
                "deposit": order.deposit,
                "reason": order.reason,
                "order": order.spec,
            }

    def _order(self, conn: Connection, order_id: str) -> HubOrder:
        row = conn.execute(select(t.orders).where(t.orders.c.id == order_id)).first()
        if row is None:
            raise Missing(f"no order {order_id}")
        return HubOrder.of(row)

    def _open_order(self, conn: Connection, order_id: str) -> HubOrder:
        order = self._order(conn, order_id)
        if order.state != OrderState.OPEN:
            raise Clash(f"order {order_id} is {order.state}")
        return order

    def _trading(self, conn: Connection, provider: str) -> Participant:
        """The provider, if it may trade now: admitted (403 with why not otherwise)."""
        who = self.participant(conn, provider, ParticipantKind.PROVIDER)
        if who.status != P.ADMITTED:
            raise NotAllowed(f"this provider is {who.status}, not admitted: {who.status_reason}")
        return who

    def bid(self, provider: str, order_id: str, raw: Any) -> dict[str, Any]:
        self.require(provider, ParticipantKind.PROVIDER)
        body = parse(BidIn, raw)
        now = time.time()
        with self.store.tx() as conn:
            self._trading(conn, provider)
            order = self._open_order(conn, order_id)
            if order.mode != "auction":
                raise Clash(f"order {order_id} is dispatched, not auctioned")
            if body.price_per_hour > order.spec["max_price_per_hour"]:
                raise HubError(
                    f"bid {body.price_per_hour} is above the order's cap "
                    f"{order.spec['max_price_per_hour']} micros per hour"
                )
            conn.execute(
                t.bids.delete().where(t.bids.c.order_id == order_id, t.bids.c.provider == provider)
            )
            conn.execute(
                t.bids.insert().values(
                    order_id=order_id,
                    provider=provider,
                    price_per_hour=body.price_per_hour,
                    expires_at=now + body.valid_s,
                    at=now,
                )
            )
        return {"order_id": order_id, "bid": body.price_per_hour}

    def answer_dispatch(self, provider: str, order_id: str, raw: Any) -> dict[str, Any]:
        self.require(provider, ParticipantKind.PROVIDER)
        body = parse(DispatchIn, raw)
        with self.store.tx() as conn:
            order = self._open_order(conn, order_id)
            if order.dispatched_to != provider:
                raise NotAllowed(f"order {order_id} was not dispatched to you")
            if body.accept:
                self._trading(conn, provider)
                if not 0 < body.price_per_hour <= order.spec["max_price_per_hour"]:
                    raise HubError("accept with a price_per_hour within the order's cap")
                self._match(conn, order, provider, body.price_per_hour)
            else:
                self._redispatch(conn, order, body.reason or "refused")
        return self.order_view(order_id)

    def _match(self, conn: Connection, order: HubOrder, provider: str, price: int) -> None:
        spec = order.spec
        ORDERS.transition(conn, order, OrderState.MATCHED, f"matched at {price} micros/h")
        conn.execute(
            t.leases.insert().values(
                id=order.id,
                tenant=order.tenant,
                provider=provider,
                state=L.WON.value,
                price_per_hour=price,
                gpus=spec["resources"]["gpus"],
                duration_s=spec["duration_s"],
                created_at=time.time(),
            )
        )
        write_journal(conn, "lease", order.id, order.tenant, None, L.WON.value, "won")
        emit(conn, provider, "won", {"lease_id": order.id, "price_per_hour": price, "order": spec})

    def _unmatched(self, conn: Connection, order: HubOrder, reason: str) -> None:
        ORDERS.transition(conn, order, OrderState.UNMATCHED, reason, reason=reason)

    def _redispatch(self, conn: Connection, order: HubOrder, reason: str) -> None:
        refused = [*order.refused_by, order.dispatched_to or ""]
        spec = Order.model_validate(order.spec)
        fit, _ = self._candidates(conn, spec, time.time())
        left = [c for c in fit if c.key not in refused]
        if not left:
            self._unmatched(conn, order, f"every provider refused or timed out (last: {reason})")
            return
        chosen = random.choice(left).key
        decide_at = time.time() + self.settings.dispatch_timeout_s
        conn.execute(
            update(t.orders)
            .where(t.orders.c.id == order.id)
            .values(dispatched_to=chosen, refused_by=refused, decide_at=decide_at)
        )
        write_journal(
            conn, "order", order.id, order.tenant, "open", "open", f"redispatched: {reason}"
        )
        emit(
            conn, chosen, "order", {"order": order.spec, "mode": "dispatch", "decide_at": decide_at}
        )

    # -- leases ---------------------------------------------------------------------

    def _lease(self, conn: Connection, lease_id: str, key: str) -> HubLease:
        row = conn.execute(select(t.leases).where(t.leases.c.id == lease_id)).first()
        if row is None or key not in (row.tenant, row.provider):
            raise Missing(f"no lease {lease_id} of yours")
        return HubLease.of(row)

    def lease_state(self, provider: str, lease_id: str, raw: Any) -> dict[str, Any]:
        self.require(provider, ParticipantKind.PROVIDER)
        body = parse(LeaseStateIn, raw)
        now = time.time()
        with self.store.tx() as conn:
            lease = self._lease(conn, lease_id, provider)
            if lease.provider != provider:
                raise NotAllowed("only the lease's provider reports its state")
            try:
                if body.state == "closed":
                    if lease.state != L.CLOSED:
                        until = min(now, body.ended_at) if body.ended_at else now
                        lifecycle.closed(
                            conn,
                            lease,
                            body.reason or CloseReason.FAILED,
                            body.detail,
                            until,
                            log_tail=body.log_tail,
                        )
                    return self._view(conn, lease_id, provider)
                target = L(body.state)
                if lease.state == target:
                    return self._view(conn, lease_id, provider)
                if lease.state == L.WON and target == L.RUNNING:  # provisioning unreported
                    LEASES.transition(conn, lease, L.PROVISIONING, "the provider started it")
                values: dict[str, Any] = {}
                if target == L.RUNNING:
                    values = {
                        "running_at": now,
                        "endpoint": body.endpoint,
                        "access_token": body.access_token,
                    }
                LEASES.transition(
                    conn, lease, target, f"reported {target} by the provider", **values
                )
            except IllegalTransition as exc:
                raise Clash(str(exc)) from None
        return self.lease_view(lease_id, provider)

    def close_lease(self, tenant: str, lease_id: str) -> dict[str, Any]:
        with self.store.tx() as conn:
            lease = self._lease(conn, lease_id, tenant)
            if lease.tenant != tenant:
                raise NotAllowed("only the lease's tenant closes it")
            if lease.state in (L.CLOSED, L.CLOSING):
                return self._view(conn, lease_id, tenant)
            lifecycle.closing(conn, lease, CloseReason.TENANT, "closed by the tenant", time.time())
        return self.lease_view(lease_id, tenant)

    def record_usage(self, provider: str, lease_id: str, raw: Any) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise HubError("usage record: a JSON object is expected")
        try:
            record = Usage.model_validate(raw, strict=True)
        except ValidationError as exc:
            raise HubError(f"usage record: {exc.errors()[0]['msg']}") from None
        with self.store.tx() as conn:
            lease = self._lease(conn, lease_id, provider)
            if lease.provider != provider or record.lease_id != lease_id:
                raise NotAllowed("usage is reported by the lease's provider, for that lease")
            last_row = conn.execute(
                select(t.usage.c.record)
                .where(t.usage.c.lease_id == lease_id)
                .order_by(t.usage.c.seq.desc())
                .limit(1)
            ).first()
            last = Usage.model_validate(last_row.record) if last_row else None
            if last and record.seq == last.seq and record.hash == last.hash:
                return {"lease_id": lease_id, "seq": record.seq, "stored": False}
            # what the provider needs to catch up when this is refused: the record the
            # hub holds last (its own, signed), and whether the lease is over here
            held = {
                "held": last.model_dump() if last else None,
                "lease_state": lease.state.value,
                "close_reason": lease.close_reason,
            }
            if lease.state == L.CLOSED and last and record.start >= last.end - 1e-6:
                raise Clash(f"lease {lease_id} is closed: no usage after its end", **held)
            try:
                check_next(record, provider, last)
            except UsageError as exc:
                raise Clash(str(exc), **held) from None
            conn.execute(
                t.usage.insert().values(
                    lease_id=lease_id,
                    seq=record.seq,
                    record=record.model_dump(),
                    gpu_seconds=sum(record.gpu_seconds.values()),
                    requests=record.requests,
                    at=time.time(),
                )
            )
        return {"lease_id": lease_id, "seq": record.seq, "stored": True}

    def lease_view(self, lease_id: str, key: str | None = None) -> dict[str, Any]:
        with self.store.read() as conn:
            return self._view(conn, lease_id, key)

    def _view(self, conn: Connection, lease_id: str, key: str | None) -> dict[str, Any]:
        row = conn.execute(select(t.leases).where(t.leases.c.id == lease_id)).first()
        if row is None:
            raise Missing(f"no lease {lease_id}")
        return self._lease_dicts(conn, [HubLease.of(row)], key)[0]

    @staticmethod
    def _lease_dicts(
        conn: Connection, leases: list[HubLease], key: str | None
    ) -> list[dict[str, Any]]:
        """Leases as `key` sees them (its tenant sees its access token), with their usage
        and escrow read in two queries for all."""
        ids = [lease.id for lease in leases]
        used = {
            lease_id: (gpu_seconds, requests)
            for lease_id, gpu_seconds, requests in conn.execute(
                select(
                    t.usage.c.lease_id,
                    func.sum(t.usage.c.gpu_seconds),
                    func.sum(t.usage.c.requests),
                )
                .where(t.usage.c.lease_id.in_(ids))
                .group_by(t.usage.c.lease_id)
            ).all()
        }
        held = dict(
            conn.execute(
                select(t.ledger.c.account, func.sum(t.ledger.c.amount))
                .where(t.ledger.c.account.in_([escrow_account(i) for i in ids]))
                .group_by(t.ledger.c.account)
            ).all()
        )
        return [
            _lease_dict(
                lease,
                used.get(lease.id) or (0.0, 0),
                held.get(escrow_account(lease.id)) or 0,
                for_tenant=key == lease.tenant,
            )
            for lease in leases
        ]

    def leases_of(self, key: str) -> list[dict[str, Any]]:
        with self.store.read() as conn:
            rows = conn.execute(
                select(t.leases)
                .where((t.leases.c.tenant == key) | (t.leases.c.provider == key))
                .order_by(t.leases.c.created_at)
            ).all()
            return self._lease_dicts(conn, [HubLease.of(r) for r in rows], key)

    def history(self, key: str, subject: str) -> dict[str, Any]:
        """An order's (and its lease's) journal, as its tenant or provider sees it."""
        with self.store.read() as conn:
            lease = conn.execute(select(t.leases).where(t.leases.c.id == subject)).first()
            order = conn.execute(select(t.orders).where(t.orders.c.id == subject)).first()
            owners = {r.tenant for r in (lease, order) if r is not None}
            if lease is not None:
                owners.add(lease.provider)
            if key not in owners:
                raise Missing(f"no order or lease {subject} of yours")
            rows = conn.execute(
                select(t.journal).where(t.journal.c.subject == subject).order_by(t.journal.c.id)
            ).all()
            view = self._lease_dicts(conn, [HubLease.of(lease)], key)[0] if lease else None
        return {
            "id": subject,
            "lease": view,
            "journal": [
                {
                    "kind": r.kind,
                    "at": r.at,
                    "from": r.from_state,
                    "to": r.to_state,
                    "reason": r.reason,
                }
                for r in rows
            ],
        }

    def orders_of(self, tenant: str) -> list[dict[str, Any]]:
        with self.store.read() as conn:
            ids = (
                conn.execute(
                    select(t.orders.c.id)
                    .where(t.orders.c.tenant == tenant)
                    .order_by(t.orders.c.created_at)
                )
                .scalars()
                .all()
            )
        return [self.order_view(i) for i in ids]

    def ledger_summary(self) -> dict[str, Any]:
        with self.store.read() as conn:
            totals = t.balances(conn)
            return {
                "deposited": t.deposited(conn),
                "drift": t.drift(conn),
                "held": sum(v for k, v in totals.items() if k != EXTERNAL),
                "accounts": totals,
            }

    def events_after(self, key: str, after: int, limit: int = 500) -> list[dict[str, Any]]:
        with self.store.read() as conn:
            self.participant(conn, key, ParticipantKind.PROVIDER)
            rows = conn.execute(
                select(t.events)
                .where(t.events.c.seq > after, t.events.c.to.in_([key, "*"]))
                .order_by(t.events.c.seq)
                .limit(limit)
            ).all()
        return [{"seq": r.seq, "kind": r.kind, "data": r.data} for r in rows]

    # -- the loop -------------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Decide what is due: auctions and dispatches, accruals, closes."""
        now = time.time() if now is None else now
        with self.store.tx() as conn:
            due = conn.execute(
                select(t.orders).where(
                    t.orders.c.state == OrderState.OPEN.value, t.orders.c.decide_at <= now
                )
            ).all()
            for order in map(HubOrder.of, due):
                if order.mode == "dispatch":
                    self._redispatch(conn, order, "no answer in time")
                else:
                    self._decide_auction(conn, order, now)
        with self.store.tx() as conn:
            live = conn.execute(select(t.leases).where(t.leases.c.closed_at.is_(None))).all()
            stale = {
                r.key
                for r in conn.execute(
                    select(t.participants.c.key).where(
                        t.participants.c.kind == ParticipantKind.PROVIDER.value,
                        t.participants.c.last_heartbeat < now - self.settings.silent_after_s,
                    )
                )
            }
            for lease in map(HubLease.of, live):
                self._keep(conn, lease, stale, now)

    def _keep(self, conn: Connection, lease: HubLease, stale: set[str], now: float) -> None:
        if lease.state == L.CLOSING:
            if now - (lease.closing_at or now) > self.settings.close_grace_s:
                detail = lease.close_detail + "; the provider did not confirm the close"
                lifecycle.closed(conn, lease, CloseReason(lease.close_reason), detail, now)
            return
        if lease.provider in stale:
            lifecycle.closing(conn, lease, CloseReason.LOST, "the provider stopped beating", now)
            return
        if lease.state != L.RUNNING:
            if now - lease.created_at > self.settings.start_timeout_s:
                why = f"not running {self.settings.start_timeout_s:g} s after it was won"
                lifecycle.closing(conn, lease, CloseReason.FAILED, why, now)
            return
        assert lease.running_at is not None
        if now - lease.running_at >= lease.duration_s:
            lifecycle.closing(conn, lease, CloseReason.EXPIRED, "its duration ran out", now)
        elif accrue(conn, lease, now) > 0:
            lifecycle.closing(
                conn, lease, CloseReason.INSUFFICIENT_FUNDS, "the deposit ran out", now
            )

    def _decide_auction(self, conn: Connection, order: HubOrder, now: float) -> None:
        spec = Order.model_validate(order.spec)
        fit, _ = self._candidates(conn, spec, now)
        eligible = {r.key for r in fit}
        offers = conn.execute(
            select(t.bids)
            .where(t.bids.c.order_id == order.id, t.bids.c.expires_at > now)
            .order_by(t.bids.c.price_per_hour, t.bids.c.at)
        ).all()
        winner = next((b for b in offers if b.provider in eligible), None)
        if winner is None:
            self._unmatched(conn, order, "no eligible bid within the auction window")
            return
        self._match(conn, order, winner.provider, winner.price_per_hour)
        for bid in offers:
            if bid.provider != winner.provider:
                emit(conn, bid.provider, "lost", {"order_id": order.id})


def _lease_dict(
    lease: HubLease, used: tuple[float, int], escrow: int, for_tenant: bool
) -> dict[str, Any]:
    return {
        "id": lease.id,
        "tenant": lease.tenant,
        "provider": lease.provider,
        "state": lease.state.value,
        "price_per_hour": lease.price_per_hour,
        "gpus": lease.gpus,
        "running_at": lease.running_at,
        "endpoint": lease.endpoint,
        "access_token": lease.access_token if for_tenant else "",
        "billed_s": lease.billed_s,
        "charged": lease.charged,
        "escrow": int(escrow),
        "reported_gpu_seconds": round(float(used[0] or 0), 3),
        "reported_requests": int(used[1] or 0),
        "close_reason": lease.close_reason,
        "close_detail": lease.close_detail,
        "log_tail": lease.log_tail,
    }
