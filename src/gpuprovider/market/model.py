"""The market model every connector maps onto: an order, the provider's decision, the
lease an order becomes (one state table for the hub and the provider alike), usage
records, and a double-entry ledger in integer minor units.

Money is an integer count of *micros* (10^-6 of the market's currency: 1,000,000 =
one USD on the reference hub), prices are micros per hour. Nothing here rounds to
zero: a charge for any positive time at a positive price is at least one micro.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gpuprovider.domain import catalogue

MICROS = 1_000_000  # micros in one unit of currency
MAX_MONEY = 10**15  # a billion units: no order, deposit or price is larger


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class OrderResources(_Strict):
    """What an order asks for, per replica."""

    gpus: Annotated[float, Field(ge=0, le=64)] = 1  # a fraction (0.25) or a count (2)
    gpu_model: Annotated[str, Field(max_length=64)] = ""  # a family (h100) or model id; "" any
    cpus: Annotated[float, Field(ge=0, le=1024)] = 1
    memory_gb: Annotated[float, Field(ge=0, le=16384)] = 4
    storage_gb: Annotated[float, Field(ge=0, le=1 << 20)] = 0
    # only GPUs whose NVIDIA CC attestation the hub verified (proof/attestation.py)
    attested: bool = False

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError("more than one GPU must be a whole number")
        return value

    @field_validator("gpu_model")
    @classmethod
    def _model(cls, value: str) -> str:
        if value:
            try:
                catalogue.resolve(value)
            except catalogue.UnknownGpuModel as exc:
                raise ValueError(str(exc)) from None
        return value

    def accepts(self, model: str) -> bool:
        """Whether a GPU of `model` satisfies the order: any GPU when unconstrained (one
        the catalogue does not know too), else the catalogue's models of that name."""
        return not self.gpu_model or model in catalogue.resolve(self.gpu_model)


class Order(_Strict):
    """What arrives from a market: resources, a price cap, how long, and the work."""

    id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    market: Annotated[str, Field(max_length=64)] = "hub"
    kind: Literal["job", "service"] = "job"
    resources: OrderResources = Field(default_factory=OrderResources)
    max_price_per_hour: Annotated[int, Field(gt=0, le=MAX_MONEY)]  # micros per hour
    duration_s: Annotated[int, Field(gt=0, le=366 * 86400)]  # longest it may run
    payload: dict[str, Any] | None = None  # a task spec; None: it arrives later
    payload_timeout_s: Annotated[int, Field(gt=0, le=3600)] = 300


class Action(StrEnum):
    DECLINE = "decline"
    BID = "bid"
    ACCEPT = "accept"


class Cause(StrEnum):
    """Why an order was declined, for whoever must act on it (a market's error code)."""

    PRICE = "price"  # our price is above the order's cap
    CAPACITY = "capacity"  # no room for it now, nor once preemptible work gives way
    NO_MODEL = "no_model"  # no GPU of the model it asks for
    PAYLOAD = "payload"  # its payload is not a task this provider can run
    UNPRICEABLE = "unpriceable"  # the pricing policy cannot price it


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    price_per_hour: int = 0  # micros, for bid and accept
    expires_at: float = 0.0  # a bid's expiry (epoch seconds)
    cause: Cause | None = None  # for a decline


class LeaseState(StrEnum):
    OFFERED = "offered"  # the order reached the provider
    BIDDING = "bidding"  # a bid is out
    WON = "won"
    LOST = "lost"  # another provider won, or this one declined
    EXPIRED = "expired"  # the bid or the order ran out before a decision
    AWAITING_PAYLOAD = "awaiting_payload"
    PROVISIONING = "provisioning"  # tasks placed, not all running yet
    RUNNING = "running"
    CLOSING = "closing"  # tasks being stopped
    CLOSED = "closed"


class CloseReason(StrEnum):
    COMPLETED = "completed"  # a job's tasks succeeded
    TENANT = "tenant"  # the tenant closed it
    INSUFFICIENT_FUNDS = "insufficient_funds"
    EXPIRED = "expired"  # its duration ran out
    UNSTABLE = "unstable"  # its tasks kept failing
    PAYLOAD_TIMEOUT = "payload_timeout"
    WORK_FAILED = "work_failed"  # the tenant's own work failed (its exit code, its OOM)
    PREEMPTED = "preempted"
    FAILED = "failed"  # the provider could not run it (not placed, not started, refused)
    LOST = "lost"  # the provider or the hub disappeared


# Closes that are the provider's fault: they count against its reliability on a market.
PROVIDER_FAULT = frozenset({CloseReason.FAILED, CloseReason.PREEMPTED, CloseReason.LOST})


L = LeaseState
TRANSITIONS: dict[LeaseState, frozenset[LeaseState]] = {
    L.OFFERED: frozenset({L.BIDDING, L.WON, L.LOST, L.EXPIRED}),
    L.BIDDING: frozenset({L.WON, L.LOST, L.EXPIRED}),
    L.WON: frozenset({L.AWAITING_PAYLOAD, L.PROVISIONING, L.CLOSING, L.CLOSED}),
    L.AWAITING_PAYLOAD: frozenset({L.PROVISIONING, L.CLOSING, L.CLOSED}),
    L.PROVISIONING: frozenset({L.RUNNING, L.CLOSING, L.CLOSED}),
    L.RUNNING: frozenset({L.CLOSING, L.CLOSED}),
    L.CLOSING: frozenset({L.CLOSED}),
    L.LOST: frozenset(),
    L.EXPIRED: frozenset(),
    L.CLOSED: frozenset(),
}
TERMINAL = frozenset({L.LOST, L.EXPIRED, L.CLOSED})
BILLED = frozenset({L.RUNNING})  # the tenant pays while the lease runs
# Won, not over: its work is (or is about to be) on this provider.
LIVE = frozenset({L.WON, L.AWAITING_PAYLOAD, L.PROVISIONING, L.RUNNING, L.CLOSING})


class Reported(StrEnum):
    """What the market has been told of a lease (the provider's side)."""

    NOTHING = ""
    PROVISIONING = "provisioning"
    RUNNING = "running"
    CLOSED = "closed"
    REFUSE = "refuse"  # a win it never agreed to: to be reported closed, as refused


def market_tenant(market: str) -> str:
    """The tenant that a market's work runs as on this provider."""
    return f"market-{market}"


@dataclass
class LeaseRecord:
    """The provider's side of a lease: the order as it came, what was decided and why,
    the work that realises it, and the usage chain sent so far."""

    id: str
    market: str
    state: LeaseState
    order: dict[str, Any]
    model: str
    price_per_hour: int
    reason: str
    task_id: str | None
    endpoint: str
    running_since: float | None
    ended_at: float | None
    close_reason: str
    reported: str
    usage_seq: int
    usage_hash: str
    usage_until: float | None
    usage_gpu_seconds: float
    usage_requests: int
    requests_mark: str
    created_at: float
    updated_at: float
    service_id: str | None = None

    @property
    def tenant(self) -> str:
        return market_tenant(self.market)

    @property
    def spec(self) -> Order:
        return Order.model_validate(self.order)

    def earned(self, now: float) -> int:
        """What it earned by this provider's count: its price for the time it ran."""
        if self.running_since is None:
            return 0
        end = self.ended_at or now
        seconds = min(end - self.running_since, self.order["duration_s"])
        return charge(self.price_per_hour, seconds)


def charge(price_per_hour: int, seconds: float) -> int:
    """Micros owed for `seconds` at `price_per_hour`, rounded up: any positive time at
    a positive price costs at least one micro (never free because it was short)."""
    if price_per_hour <= 0 or seconds <= 0:
        return 0
    return math.ceil(price_per_hour * seconds / 3600)


# -- the ledger -----------------------------------------------------------------------

EXTERNAL = "external"  # where deposits come from and withdrawals go: the world


def tenant_account(tenant: str) -> str:
    return f"tenant:{tenant}"


def escrow_account(lease: str) -> str:
    return f"escrow:{lease}"


def provider_account(provider: str) -> str:
    return f"provider:{provider}"


@dataclass(frozen=True)
class Posting:
    """One side of a transfer: `amount` micros into `account` (negative: out of it)."""

    txn: str
    account: str
    amount: int


@dataclass
class Transfer:
    """Money moved from one account to another in one transaction: two postings that
    sum to zero, so every account together always sums to zero and the accounts other
    than `external` to what was deposited."""

    txn: str
    source: str
    target: str
    amount: int
    memo: str = ""
    postings: list[Posting] = field(init=False)

    def __post_init__(self) -> None:
        if not 0 < self.amount <= MAX_MONEY:
            raise ValueError(f"a transfer moves 1 to {MAX_MONEY} micros, not {self.amount}")
        if self.source == self.target:
            raise ValueError("a transfer needs two different accounts")
        self.postings = [
            Posting(self.txn, self.source, -self.amount),
            Posting(self.txn, self.target, self.amount),
        ]


def fmt_money(micros: int) -> str:
    """`12.345678` for 12,345,678 micros."""
    sign = "-" if micros < 0 else ""
    whole, part = divmod(abs(micros), MICROS)
    return f"{sign}{whole}.{part:06d}"
