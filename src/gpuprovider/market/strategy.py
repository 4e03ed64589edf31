"""How a provider answers the market beside its price table: a named *strategy*.

Two protocols, one per kind of market:

- `Strategy` (lease markets: the reference hub, Swan, Akash): for one order, given what
  the provider knows now, decline, or bid/accept with a price per hour and a reason,
  naming the GPU model it would run on; told afterwards whether its bid won.
- `AppStrategy` (inference-app markets: Chutes): every tick, given the validator's
  public figures per app and the provider's own deployments, scale apps up, down, or
  preempt one deployment for another.

Everything a strategy is handed is something a live provider has: the order as the
market sent it (cap and declared duration, never how long the work will really run),
where its own scheduler would place the work, its own GPUs and leases, the built-in
pricing's quote, the outcomes of its own bids, and for app markets the figures a
validator publishes. A strategy never sees other providers' prices or fleets, the
future, or a simulation's parameters: the simulator (`market/sim/`) runs it through
this interface only, so it cannot cheat there either.

`decide_safely` is what a caller runs: a strategy that raises, or answers something
the market would refuse (a price above the cap, a model that does not fit), is
replaced by the built-in pricing for that order, and the reason says so.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol

from gpuprovider.market.model import MAX_MONEY, Action, Cause, Decision, Order
from gpuprovider.market.pricing import Quote, Unpriceable
from gpuprovider.scheduler.framework import Framework, Policy
from gpuprovider.scheduler.model import Placement, TaskRequest
from gpuprovider.scheduler.state import ClusterState

log = logging.getLogger(__name__)


class Mode(StrEnum):
    AUCTION = "auction"  # the hub collects bids; the lowest wins
    DISPATCH = "dispatch"  # the hub offers the order to one provider, which accepts or not


@dataclass(frozen=True)
class Option:
    """One GPU model the order could run on here, as this provider's scheduler sees it."""

    model: str  # "" for an order that wants no GPU
    request: TaskRequest  # what the scheduler would place (the lease's task)
    placement: Placement | None  # where it would go now; None: nowhere now
    fits_later: bool = False  # once the operator's preemptible work gave way
    why: str = ""  # why not now, in the scheduler's words
    quote: Quote | None = None  # the built-in pricing on this model; None: unpriceable
    unpriceable: str = ""  # why there is no quote

    @property
    def fits_now(self) -> bool:
        return self.placement is not None

    @property
    def usable(self) -> bool:
        return self.fits_now or self.fits_later


@dataclass(frozen=True)
class LeaseView:
    """A lease this provider runs now."""

    id: str
    model: str
    gpus: float
    price_per_hour: int  # micros
    started_at: float
    ends_by: float  # started_at + the order's declared duration: the latest it runs


@dataclass(frozen=True)
class Situation:
    """What a lease strategy decides from. `cluster` and `leases` are the caller's and
    read-only: a strategy that wants to try a placement copies what it changes."""

    order: Order
    now: float
    options: tuple[Option, ...]
    cluster: ClusterState  # this provider's nodes and what is free on them now
    leases: Collection[LeaseView] = ()
    mode: Mode = Mode.AUCTION


@dataclass(frozen=True)
class Choice:
    """A strategy's answer: the decision (with its reason), the model it names, and who
    decided (the built-in pricing when the strategy failed)."""

    decision: Decision
    model: str = ""
    decided_by: str = ""
    error: str = ""  # why the strategy's own answer was not used

    @property
    def bids(self) -> bool:
        return self.decision.action != Action.DECLINE


@dataclass(frozen=True)
class Outcome:
    """What became of a bid: the market's answer, as the provider hears it."""

    order_id: str
    won: bool
    price_per_hour: int  # what this provider asked
    at: float


class Strategy(Protocol):
    name: str

    def decide(self, situation: Situation) -> Choice:
        """Decline, or offer (`Action.BID`; `decide_safely` makes it ACCEPT in a
        dispatch) at a price per hour in micros on one of the options' models."""
        ...

    def observe(self, outcome: Outcome) -> None:
        """Hear whether a bid won (the hub's `won` and `lost` events)."""
        ...


def probe(
    cluster: ClusterState,
    framework: Framework,
    requests: Mapping[str, TaskRequest],
    quotes: Mapping[str, Quote | Unpriceable],
    fits_later: Mapping[str, bool] | None = None,
) -> tuple[Option, ...]:
    """One option per model in `requests` (in their order): where `framework` would
    place it on `cluster` now (tried, then given back: `cluster` ends as it began), its
    quote or why there is none, and whether it fits once preemptible work gave way."""
    found = []
    for model, request in requests.items():
        priced = quotes.get(model)
        quote = priced if isinstance(priced, Quote) else None
        unpriceable = str(priced) if isinstance(priced, Unpriceable) else ""
        gpu = request.gpu
        room = cluster.eligible_gpus(gpu) & (cluster.gpu_free >= gpu.milli_per_gpu)
        placement: Placement | None = None
        if gpu.wants_gpu and int(room.sum()) < gpu.gpus_touched:
            # the model's free GPUs added up cannot hold it: say so without asking
            why = f"no {gpu.describe()} free"
        else:
            decided = framework.decide(cluster, request)
            if isinstance(decided, Placement):
                placement, why = decided, ""
                cluster.unreserve(placement)
            else:
                why = decided.reason
        later = placement is not None or bool((fits_later or {}).get(model, False))
        found.append(Option(model, request, placement, later, why, quote, unpriceable))
    return tuple(found)


def decline(reason: str, decided_by: str, cause: Cause = Cause.CAPACITY) -> Choice:
    return Choice(Decision(Action.DECLINE, reason, cause=cause), "", decided_by)


def offer(situation: Situation, option: Option, price: int, reason: str, by: str) -> Choice:
    """An offer at `price` on `option`'s model, valid `BID_VALID_S`."""
    return Choice(
        Decision(Action.BID, reason, price, situation.now + BID_VALID_S), option.model, by
    )


BID_VALID_S = 60.0  # the daemon's default [market] bid_valid_s


def invalid(choice: Choice, situation: Situation) -> str:
    """Why the market would refuse this answer (empty: it is fine)."""
    d = choice.decision
    if not isinstance(d, Decision) or not isinstance(d.action, Action):
        return f"answered {type(d).__name__}, not a Decision"
    if d.action == Action.DECLINE:
        return ""
    if not isinstance(d.price_per_hour, int) or not 0 < d.price_per_hour <= MAX_MONEY:
        return f"price {d.price_per_hour!r} is not a positive whole number of micros"
    if d.price_per_hour > situation.order.max_price_per_hour:
        cap = situation.order.max_price_per_hour
        return f"price {d.price_per_hour} is above the order's cap {cap}"
    if not any(o.model == choice.model and o.usable for o in situation.options):
        return f"model {choice.model!r} is not one this order fits on here"
    return ""


def decide_safely(strategy: Strategy, situation: Situation, fallback: Strategy) -> Choice:
    """The strategy's answer, or the fallback's (the built-in pricing) when the strategy
    raises or answers what the market would refuse; then `error` and the reason say why.
    An offer is a BID in an auction and an ACCEPT in a dispatch."""
    try:
        choice = strategy.decide(situation)
        if not isinstance(choice, Choice):
            raise TypeError(f"decide returned {type(choice).__name__}, not a Choice")
        wrong = invalid(choice, situation)
        if wrong:
            raise ValueError(wrong)
    except Exception as exc:  # any failure of a pluggable rule: never stop the caller
        error = f"{type(exc).__name__}: {exc}"[:300]
        log.warning("strategy %s failed on order %s: %s", strategy.name, situation.order.id, error)
        base = fallback.decide(situation)
        reason = (
            f"strategy {strategy.name} failed ({error}); {fallback.name}: {base.decision.reason}"
        )
        choice = replace(base, decision=replace(base.decision, reason=reason[:2000]), error=error)
    if choice.bids and situation.mode == Mode.DISPATCH:
        choice = replace(choice, decision=replace(choice.decision, action=Action.ACCEPT))
    return choice


def observe_safely(strategy: Strategy, outcome: Outcome) -> str:
    """Tell the strategy an outcome; what it raised, if anything (never raised on)."""
    try:
        strategy.observe(outcome)
    except Exception as exc:
        log.warning("strategy %s failed to observe %s: %s", strategy.name, outcome.order_id, exc)
        return f"{type(exc).__name__}: {exc}"[:300]
    return ""


# -- inference-app markets ------------------------------------------------------------


class Reward(StrEnum):
    """What an app market's validator rewards, each as this miner's share of the total."""

    COMPUTE_UNITS = "compute_units"  # compute time x the GPU's compute multiplier
    INVOCATIONS = "invocations"
    UNIQUE_APPS = "unique_apps"  # apps with an instance of this miner, averaged over time


@dataclass(frozen=True)
class AppInfo:
    """What the validator publishes about one app over its metrics window."""

    app_id: str
    gpu_count: int  # GPUs per instance
    models: frozenset[str]  # the GPU models it runs on
    instances: int  # across every miner, starting or ready
    miners: int  # miners with an instance of it
    capacity: float  # reference-GPU work per second its instances can serve
    compute_time_s: float  # instance-seconds of compute served in the window
    compute_multiplier: float  # per instance, as the validator credits it
    invocations: float  # served in the window
    rate_limited: float  # refused for want of capacity in the window
    work_per_request_s: float  # mean reference-GPU seconds per request
    last_invoked_at: float  # -inf when never
    bounty: bool = False  # requests arrived and no instance anywhere runs it


@dataclass(frozen=True)
class Deployment:
    """One of this miner's instances."""

    id: str
    app_id: str
    node_id: str
    model: str
    gpus: int
    gpu_uuids: tuple[str, ...]
    started_at: float
    ready_at: float  # when it was verified (serves from then on)
    last_invoked_at: float  # -inf when never
    served_window: float = 0.0  # requests it served in the window
    job: bool = False  # a one-off job the validator assigned (never preempted)


@dataclass(frozen=True)
class AppMarketView:
    now: float
    window_s: float  # the validator's metrics window
    apps: Sequence[AppInfo]
    deployments: Sequence[Deployment]  # this miner's
    cluster: ClusterState  # this miner's nodes and what is free on them (read-only)
    hourly_cost: Mapping[str, float]  # this miner's cost per GPU-hour, per model
    speed: Mapping[str, float]  # throughput per GPU model, the reference GPU = 1
    multiplier: Mapping[str, float]  # the validator's compute multiplier per GPU model
    weights: Mapping[Reward, float]  # the validator's public scoring weights
    concurrency: int  # requests an instance serves at once (the validator's cap)
    totals: Mapping[Reward, float] = field(default_factory=dict)  # market-wide, per hour
    covered_s: float = 0.0  # seconds the window's figures cover yet (the window, once full)

    @property
    def figures_s(self) -> float:
        return self.covered_s or self.window_s


class Step(StrEnum):
    SCALE_UP = "scale_up"
    SCALE_DOWN = "scale_down"
    PREEMPT = "preempt"  # stop a deployment so that another app can start


@dataclass(frozen=True)
class AppAction:
    step: Step
    app_id: str  # the app scaled up (or, for a preemption, the one making room)
    reason: str
    models: frozenset[str] = frozenset()  # scale up: the GPU models it may go on
    deployment_id: str = ""  # scale down and preempt: the deployment stopped


class AppStrategy(Protocol):
    name: str
    policy: Policy  # how the scheduler places this strategy's instances

    def plan(self, view: AppMarketView) -> list[AppAction]:
        """What to do now; the caller applies the actions in order, each placed by the
        scheduler, and skips one that no longer fits or names nothing it has."""
        ...
