"""The reference hub's rules: who may take part, how orders are matched, how money
moves. Every method is one transaction; the loop (`tick`) decides auctions and
dispatches, accrues escrow to providers each second and closes leases whose deposit
ran out, whose time is up or whose provider went silent."""

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

from gpuprovider.hub import store as t
from gpuprovider.hub.store import HubStore, balance, emit, new_id, post
from gpuprovider.market.model import (
    EXTERNAL,
    MAX_MONEY,
    CloseReason,
    LeaseState,
    Order,
    Transfer,
    charge,
    check_transition,
    escrow_account,
    provider_account,
    tenant_account,
)
from gpuprovider.market.usage import Usage, UsageError, check_next
from gpuprovider.proof.remote import AttestMode, RemoteError, RemoteVerifier

log = logging.getLogger(__name__)


class HubError(Exception):
    status = 422


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
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ProviderIn(_Body):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    api_url: Annotated[str, Field(max_length=512, pattern=r"^https?://")]
    verify_token: Annotated[str, Field(min_length=1, max_length=256)]


class TenantIn(_Body):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class OrderIn(_Body):
    order: dict[str, Any]  # an Order without its id (the hub names it)
    mode: Literal["auction", "dispatch"] = "auction"
    deposit: Annotated[int, Field(gt=0, le=MAX_MONEY)]


class BidIn(_Body):
    price_per_hour: Annotated[int, Field(gt=0, le=MAX_MONEY)]
    valid_s: Annotated[float, Field(gt=0, le=3600)] = 60.0


class DispatchIn(_Body):
    accept: bool
    price_per_hour: Annotated[int, Field(ge=0, le=MAX_MONEY)] = 0
    reason: Annotated[str, Field(max_length=500)] = ""


class LeaseStateIn(_Body):
    state: Literal["provisioning", "running", "closed"]
    reason: CloseReason | None = None
    detail: Annotated[str, Field(max_length=1000)] = ""
    endpoint: Annotated[str, Field(max_length=512)] = ""
    ended_at: float | None = None  # when its tasks stopped: billing ends there, if earlier


class DepositIn(_Body):
    tenant: Annotated[str, Field(min_length=1, max_length=64)]  # name or key
    amount: Annotated[int, Field(gt=0, le=MAX_MONEY)]


def parse(model: type[BaseModel], raw: Any) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "body"
        raise HubError(f"{where}: {error['msg']}") from None


def reliability(row: Any) -> float:
    return (row.completed + 1) / (row.completed + row.failed + 2)


class Hub:
    def __init__(self, store: HubStore, settings: HubSettings, verifier_key: Ed25519PrivateKey):
        self.store, self.settings, self.verifier_key = store, settings, verifier_key

    def started(self) -> None:
        """After the hub was down, providers could not beat: count their silence from
        now, so no lease is closed as lost for the hub's own outage."""
        with self.store.tx() as conn:
            conn.execute(
                update(t.participants)
                .where(t.participants.c.kind == "provider")
                .values(last_heartbeat=time.time())
            )

    # -- who takes part -----------------------------------------------------------------

    def participant(self, conn: Connection, key: str, kind: str) -> Any:
        row = conn.execute(select(t.participants).where(t.participants.c.key == key)).first()
        if row is None or row.kind != kind:
            raise NotAllowed(f"no {kind} registered with this key; register first")
        return row

    def require(self, key: str, kind: str) -> None:
        """NotAllowed unless `key` is a registered `kind`: checked before a body is read."""
        with self.store.read() as conn:
            self.participant(conn, key, kind)

    def register(self, key: str, kind: str, raw: Any) -> dict[str, Any]:
        body = parse(ProviderIn if kind == "provider" else TenantIn, raw)
        now = time.time()
        with self.store.tx() as conn:
            existing = conn.execute(
                select(t.participants).where(t.participants.c.key == key)
            ).first()
            if existing is not None and existing.kind != kind:
                raise Clash(f"this key is registered as a {existing.kind}")
            taken = conn.execute(
                select(t.participants.c.key).where(
                    t.participants.c.kind == kind,
                    t.participants.c.name == body.name,
                    t.participants.c.key != key,
                )
            ).first()
            if taken:
                raise Clash(f"another {kind} is registered as {body.name!r}")
            values: dict[str, Any] = {"name": body.name}
            if kind == "provider":
                values |= {
                    "api_url": body.api_url.rstrip("/"),
                    "verify_token": body.verify_token,
                    "status": "pending",
                    "status_reason": "waiting for proof of GPU",
                    "last_heartbeat": now,
                }
            else:
                values["status"] = "admitted"
            if existing is None:
                conn.execute(
                    t.participants.insert().values(
                        key=key, kind=kind, registered_at=now, gpus=[], **values
                    )
                )
            else:
                conn.execute(
                    update(t.participants).where(t.participants.c.key == key).values(**values)
                )
        return self.describe(key)

    def describe(self, key: str) -> dict[str, Any]:
        with self.store.read() as conn:
            row = conn.execute(select(t.participants).where(t.participants.c.key == key)).first()
            if row is None:
                raise Missing("no participant with this key")
            return {
                "key": row.key,
                "kind": row.kind,
                "name": row.name,
                "status": row.status,
                "status_reason": row.status_reason,
                "gpus": row.gpus,
                "reliability": round(reliability(row), 3),
                "balance": balance(
                    conn,
                    provider_account(row.key)
                    if row.kind == "provider"
                    else tenant_account(row.key),
                ),
            }

    def admit(self, key: str) -> dict[str, Any]:
        """Prove every GPU of a provider (blocking: the app runs it on a thread). Admitted
        only if every GPU passes, with a real (or, when allowed, simulated) verdict."""
        with self.store.read() as conn:
            row = self.participant(conn, key, "provider")
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
                problems += [f"{o.gpu_uuid}: simulated" for o in outcomes if o.simulated]
        except RemoteError as exc:
            outcomes, problems = [], [str(exc)]
        status = "refused" if problems else "admitted"
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
            current = self.participant(conn, key, "provider")
            if current.status == "suspended" and not problems:
                status = "admitted"
            conn.execute(
                update(t.participants)
                .where(t.participants.c.key == key)
                .values(status=status, status_reason=reason, gpus=gpus, last_proof_at=time.time())
            )
            emit(conn, key, "admission", {"status": status, "reason": reason})
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
                    t.participants.c.kind == "provider", t.participants.c.status == "admitted"
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
            self.participant(conn, key, "provider")
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
                    t.participants.c.kind == "tenant",
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

    def _candidates(self, conn: Connection, order: Order, now: float) -> list[Any]:
        """Admitted, live, reliable providers with enough proven GPUs of a wanted model."""
        need = max(1, math.ceil(order.resources.gpus))
        rows = conn.execute(
            select(t.participants).where(
                t.participants.c.kind == "provider", t.participants.c.status == "admitted"
            )
        ).all()
        fit = []
        for row in rows:
            count = sum(
                1
                for g in row.gpus
                if order.resources.accepts(g["model"])
                and (g.get("attested") or not order.resources.attested)
            )
            if (order.resources.gpus or order.resources.attested) and count < need:
                continue
            if (row.last_heartbeat or 0) < now - self.settings.silent_after_s:
                continue
            if reliability(row) < self.settings.reliability_floor:
                continue
            fit.append(row)
        return fit

    def post_order(self, tenant: str, raw: Any) -> dict[str, Any]:
        self.require(tenant, "tenant")
        body = parse(OrderIn, raw)
        order_id = new_id("ord")
        order = parse(Order, {**body.order, "id": order_id, "market": "hub"})
        now = time.time()
        with self.store.tx() as conn:
            self.participant(conn, tenant, "tenant")
            candidates = self._candidates(conn, order, now)
            if not candidates:
                raise HubError(
                    "no admitted provider could ever run this order: none has "
                    f"{math.ceil(order.resources.gpus)} proven"
                    f"{' and attested' if order.resources.attested else ''} GPU(s) of "
                    f"{order.resources.gpu_model or 'any model'}; nothing was charged"
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
                    state="open",
                    deposit=body.deposit,
                    created_at=now,
                    decide_at=decide_at,
                    dispatched_to=dispatched,
                    refused_by=[],
                )
            )
            announce = {"order": order.model_dump(), "mode": body.mode, "decide_at": decide_at}
            for row in [r for r in candidates if r.key == dispatched] if dispatched else candidates:
                emit(conn, row.key, "order", announce)
        return self.order_view(order_id)

    def order_view(self, order_id: str) -> dict[str, Any]:
        with self.store.read() as conn:
            row = conn.execute(select(t.orders).where(t.orders.c.id == order_id)).first()
            if row is None:
                raise Missing(f"no order {order_id}")
            return {
                "id": row.id,
                "state": row.state,
                "mode": row.mode,
                "deposit": row.deposit,
                "reason": row.reason,
                "order": row.spec,
            }

    def _open_order(self, conn: Connection, order_id: str) -> Any:
        row = conn.execute(select(t.orders).where(t.orders.c.id == order_id)).first()
        if row is None:
            raise Missing(f"no order {order_id}")
        if row.state != "open":
            raise Clash(f"order {order_id} is {row.state}")
        return row

    def bid(self, provider: str, order_id: str, raw: Any) -> dict[str, Any]:
        self.require(provider, "provider")
        body = parse(BidIn, raw)
        now = time.time()
        with self.store.tx() as conn:
            row = self._open_order(conn, order_id)
            if row.mode != "auction":
                raise Clash(f"order {order_id} is dispatched, not auctioned")
            if body.price_per_hour > row.spec["max_price_per_hour"]:
                raise HubError(
                    f"bid {body.price_per_hour} is above the order's cap "
                    f"{row.spec['max_price_per_hour']} micros per hour"
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
        self.require(provider, "provider")
        body = parse(DispatchIn, raw)
        with self.store.tx() as conn:
            row = self._open_order(conn, order_id)
            if row.dispatched_to != provider:
                raise NotAllowed(f"order {order_id} was not dispatched to you")
            if body.accept:
                if not 0 < body.price_per_hour <= row.spec["max_price_per_hour"]:
                    raise HubError("accept with a price_per_hour within the order's cap")
                self._match(conn, row, provider, body.price_per_hour)
            else:
                self._redispatch(conn, row, body.reason or "refused")
        return self.order_view(order_id)

    def _match(self, conn: Connection, row: Any, provider: str, price: int) -> None:
        spec = row.spec
        now = time.time()
        conn.execute(update(t.orders).where(t.orders.c.id == row.id).values(state="matched"))
        conn.execute(
            t.leases.insert().values(
                id=row.id,
                tenant=row.tenant,
                provider=provider,
                state=LeaseState.WON.value,
                price_per_hour=price,
                gpus=spec["resources"]["gpus"],
                duration_s=spec["duration_s"],
                created_at=now,
            )
        )
        emit(conn, provider, "won", {"lease_id": row.id, "price_per_hour": price, "order": spec})

    def _unmatched(self, conn: Connection, row: Any, reason: str) -> None:
        conn.execute(
            update(t.orders).where(t.orders.c.id == row.id).values(state="unmatched", reason=reason)
        )
        self._refund(conn, row.id, row.tenant)

    def _redispatch(self, conn: Connection, row: Any, reason: str) -> None:
        refused = [*row.refused_by, row.dispatched_to]
        order = Order.model_validate(row.spec)
        left = [c for c in self._candidates(conn, order, time.time()) if c.key not in refused]
        if not left:
            self._unmatched(conn, row, f"every provider refused or timed out (last: {reason})")
            return
        chosen = random.choice(left).key
        decide_at = time.time() + self.settings.dispatch_timeout_s
        conn.execute(
            update(t.orders)
            .where(t.orders.c.id == row.id)
            .values(dispatched_to=chosen, refused_by=refused, decide_at=decide_at)
        )
        emit(conn, chosen, "order", {"order": row.spec, "mode": "dispatch", "decide_at": decide_at})

    def _refund(self, conn: Connection, lease_or_order: str, tenant: str) -> None:
        left = balance(conn, escrow_account(lease_or_order))
        if left > 0:
            post(
                conn,
                Transfer(
                    new_id("ref"),
                    escrow_account(lease_or_order),
                    tenant_account(tenant),
                    left,
                    "refund",
                ),
            )

    # -- leases ---------------------------------------------------------------------

    def _lease(self, conn: Connection, lease_id: str, key: str) -> Any:
        row = conn.execute(select(t.leases).where(t.leases.c.id == lease_id)).first()
        if row is None or key not in (row.tenant, row.provider):
            raise Missing(f"no lease {lease_id} of yours")
        return row

    def lease_state(self, provider: str, lease_id: str, raw: Any) -> dict[str, Any]:
        self.require(provider, "provider")
        body = parse(LeaseStateIn, raw)
        now = time.time()
        with self.store.tx() as conn:
            row = self._lease(conn, lease_id, provider)
            if row.provider != provider:
                raise NotAllowed("only the lease's provider reports its state")
            current = LeaseState(row.state)
            if body.state == "closed":
                if current == LeaseState.CLOSED:
                    return self.lease_view(lease_id)
                until = min(now, body.ended_at) if body.ended_at else now
                self._close(conn, row, body.reason or CloseReason.FAILED, body.detail, until)
            else:
                target = LeaseState(body.state)
                if current == target:
                    return self.lease_view(lease_id)
                try:  # a provider may report running without provisioning first
                    if current == LeaseState.WON and target == LeaseState.RUNNING:
                        check_transition(LeaseState.PROVISIONING, target)
                    else:
                        check_transition(current, target)
                except ValueError as exc:
                    raise Clash(str(exc)) from None
                values: dict[str, Any] = {"state": target.value}
                if target == LeaseState.RUNNING:
                    values |= {"running_at": now, "endpoint": body.endpoint}
                conn.execute(update(t.leases).where(t.leases.c.id == lease_id).values(**values))
        return self.lease_view(lease_id)

    def close_lease(self, tenant: str, lease_id: str) -> dict[str, Any]:
        with self.store.tx() as conn:
            row = self._lease(conn, lease_id, tenant)
            if row.tenant != tenant:
                raise NotAllowed("only the lease's tenant closes it")
            if LeaseState(row.state) in (LeaseState.CLOSED, LeaseState.CLOSING):
                return self.lease_view(lease_id)
            self._closing(conn, row, CloseReason.TENANT, "closed by the tenant", time.time())
        return self.lease_view(lease_id)

    def _accrue(self, conn: Connection, row: Any, until: float, final: bool = False) -> int:
        """Move what the running lease owes up to `until` from escrow to the provider;
        what could not be paid (escrow ran out). `final`: the lease ends at `until`, and
        anything accrued beyond it is returned."""
        row = conn.execute(select(t.leases).where(t.leases.c.id == row.id)).one()  # as it is now
        if row.running_at is None:
            return 0
        seconds = min(max(0.0, until - row.running_at), float(row.duration_s))
        owed = charge(row.price_per_hour, seconds) - row.charged
        if owed < 0 and final:
            # the work ended before the hub heard (it was down, or the report was slow):
            # what was accrued past the end goes back to escrow, and from there the tenant
            back = min(-owed, balance(conn, provider_account(row.provider)))
            if back > 0:
                post(
                    conn,
                    Transfer(
                        new_id("cor"),
                        provider_account(row.provider),
                        escrow_account(row.id),
                        back,
                        "accrued past the end",
                    ),
                )
            conn.execute(
                update(t.leases)
                .where(t.leases.c.id == row.id)
                .values(charged=row.charged - back, billed_s=seconds)
            )
            return 0
        if owed <= 0:
            return 0
        left = balance(conn, escrow_account(row.id))
        paid = min(owed, left)
        if paid > 0:
            post(
                conn,
                Transfer(
                    new_id("pay"),
                    escrow_account(row.id),
                    provider_account(row.provider),
                    paid,
                    "accrual",
                ),
            )
        conn.execute(
            update(t.leases)
            .where(t.leases.c.id == row.id)
            .values(charged=row.charged + paid, billed_s=seconds)
        )
        return owed - paid

    def _closing(self, conn: Connection, row: Any, reason: CloseReason, detail: str, now: float):
        """Stop billing and ask the provider to stop its tasks."""
        self._accrue(conn, row, now)
        conn.execute(
            update(t.leases)
            .where(t.leases.c.id == row.id)
            .values(
                state=LeaseState.CLOSING.value,
                close_reason=reason.value,
                close_detail=detail,
                closing_at=now,
            )
        )
        emit(conn, row.provider, "close", {"lease_id": row.id, "reason": reason.value})

    def _close(self, conn: Connection, row: Any, reason: CloseReason, detail: str, now: float):
        """The lease is over: final accrual (unless already closing), refund, counters."""
        if LeaseState(row.state) != LeaseState.CLOSING:
            self._accrue(conn, row, now, final=True)
        else:  # the reason the hub asked for stands
            reason = CloseReason(row.close_reason or reason)
        conn.execute(
            update(t.leases)
            .where(t.leases.c.id == row.id)
            .values(
                state=LeaseState.CLOSED.value,
                close_reason=reason.value,
                close_detail=detail or row.close_detail,
                closed_at=now,
            )
        )
        self._refund(conn, row.id, row.tenant)
        good = reason in (
            CloseReason.COMPLETED,
            CloseReason.TENANT,
            CloseReason.EXPIRED,
            CloseReason.INSUFFICIENT_FUNDS,
        )
        column = "completed" if good else "failed"
        conn.execute(
            update(t.participants)
            .where(t.participants.c.key == row.provider)
            .values({column: getattr(t.participants.c, column) + 1})
        )

    def record_usage(self, provider: str, lease_id: str, raw: Any) -> dict[str, Any]:
        try:
            record = Usage.model_validate(raw)
        except ValidationError as exc:
            raise HubError(f"usage record: {exc.errors()[0]['msg']}") from None
        with self.store.tx() as conn:
            row = self._lease(conn, lease_id, provider)
            if row.provider != provider or record.lease_id != lease_id:
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
            try:
                check_next(record, provider, last)
            except UsageError as exc:
                raise Clash(str(exc)) from None
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

    def lease_view(self, lease_id: str) -> dict[str, Any]:
        with self.store.read() as conn:
            row = conn.execute(select(t.leases).where(t.leases.c.id == lease_id)).first()
            if row is None:
                raise Missing(f"no lease {lease_id}")
            return self._lease_dicts(conn, [row])[0]

    @staticmethod
    def _lease_dicts(conn: Connection, rows: list[Any]) -> list[dict[str, Any]]:
        """Leases as shown, with their usage and escrow read in two queries for all."""
        ids = [row.id for row in rows]
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
            _lease_dict(row, used.get(row.id) or (0.0, 0), held.get(escrow_account(row.id)) or 0)
            for row in rows
        ]

    def leases_of(self, key: str) -> list[dict[str, Any]]:
        with self.store.read() as conn:
            rows = conn.execute(
                select(t.leases)
                .where((t.leases.c.tenant == key) | (t.leases.c.provider == key))
                .order_by(t.leases.c.created_at)
            ).all()
            return self._lease_dicts(conn, rows)

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
            self.participant(conn, key, "provider")
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
                select(t.orders).where(t.orders.c.state == "open", t.orders.c.decide_at <= now)
            ).all()
            for row in due:
                if row.mode == "dispatch":
                    self._redispatch(conn, row, "no answer in time")
                else:
                    self._decide_auction(conn, row, now)
        with self.store.tx() as conn:
            live = conn.execute(select(t.leases).where(t.leases.c.closed_at.is_(None))).all()
            stale = {
                r.key
                for r in conn.execute(
                    select(t.participants.c.key).where(
                        t.participants.c.kind == "provider",
                        t.participants.c.last_heartbeat < now - self.settings.silent_after_s,
                    )
                )
            }
            for row in live:
                state = LeaseState(row.state)
                if state == LeaseState.CLOSING:
                    if now - (row.closing_at or now) > self.settings.close_grace_s:
                        self._close(
                            conn,
                            row,
                            CloseReason(row.close_reason),
                            (row.close_detail + "; the provider did not confirm the close"),
                            now,
                        )
                    continue
                if row.provider in stale:
                    self._closing(conn, row, CloseReason.LOST, "the provider stopped beating", now)
                    continue
                if state != LeaseState.RUNNING:
                    if now - row.created_at > self.settings.start_timeout_s:
                        why = f"not running {self.settings.start_timeout_s:g} s after it was won"
                        self._closing(conn, row, CloseReason.FAILED, why, now)
                    continue
                if now - row.running_at >= row.duration_s:
                    self._closing(conn, row, CloseReason.EXPIRED, "its duration ran out", now)
                elif self._accrue(conn, row, now) > 0:
                    self._closing(
                        conn, row, CloseReason.INSUFFICIENT_FUNDS, "the deposit ran out", now
                    )

    def _decide_auction(self, conn: Connection, row: Any, now: float) -> None:
        order = Order.model_validate(row.spec)
        eligible = {r.key for r in self._candidates(conn, order, now)}
        offers = conn.execute(
            select(t.bids)
            .where(t.bids.c.order_id == row.id, t.bids.c.expires_at > now)
            .order_by(t.bids.c.price_per_hour, t.bids.c.at)
        ).all()
        winner = next((b for b in offers if b.provider in eligible), None)
        if winner is None:
            self._unmatched(conn, row, "no eligible bid within the auction window")
            return
        self._match(conn, row, winner.provider, winner.price_per_hour)
        for bid in offers:
            if bid.provider != winner.provider:
                emit(conn, bid.provider, "lost", {"order_id": row.id})


def _lease_dict(row: Any, used: tuple[float, int], escrow: int) -> dict[str, Any]:
    return {
        "id": row.id,
        "tenant": row.tenant,
        "provider": row.provider,
        "state": row.state,
        "price_per_hour": row.price_per_hour,
        "gpus": row.gpus,
        "running_at": row.running_at,
        "endpoint": row.endpoint,
        "billed_s": row.billed_s,
        "charged": row.charged,
        "escrow": int(escrow),
        "reported_gpu_seconds": round(float(used[0] or 0), 3),
        "reported_requests": int(used[1] or 0),
        "close_reason": row.close_reason,
        "close_detail": row.close_detail,
    }
