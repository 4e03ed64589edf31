"""Scenario A: a lease market (the reference hub's reverse auction) made from the openb
pods, with this provider and K competitors bidding, on a virtual clock.

- *Fleets*: every provider has the same mix of nodes (`fleet.DEFAULT_FLEET`), each
  GPU model priced from the reference prices (`fleet.REFERENCE_COLUMN`): what renters
  pay on a spot market, and what the price table (`[pricing] gpu_hour`) holds.
- *Orders*: GPU pods of an openb trace. The trace's busy weeks are cut into windows of
  the horizon's length; a seed picks enough windows, each shifted by its own offset
  (wrapping), to offer `load` times the market's GPUs, so arrivals keep the trace's
  burstiness and each pod keeps its shape (GPUs or a share, CPU, memory) and its real
  duration (deletion - creation; a pod of 0 s is held for 60 s). A model constraint
  (`gpu_spec`) maps openb's models onto the fleet's (`OPENB_TO_FLEET`); a pod without
  one names a model drawn in proportion to the market's GPUs of each model that has
  nodes big enough (a tenant on a lease market names a GPU). The order declares the
  next step of `DURATION_LADDER_S` above the real duration: the provider never learns
  the real one before the lease ends.
- *Caps*: the cheapest acceptable model's reference price for the order's GPUs, times a
  factor drawn in `cap_range`.
- *Competitors*: bid the reference price of the cheapest model they can place the order
  on now, times a factor drawn in `competitor_range` per order and competitor.
- *Auction*: every provider that bids holds the placement its scheduler chose until the
  auction closes `auction_window_s` later (the hub's window; as Akash's provider
  reserves inventory for a bid) or its bid expires; the lowest valid bid at or under
  the cap wins (ties drawn by seed) and runs for the pod's real duration.
- *Money*: the winner earns its price for the time the lease runs within the horizon
  (`model.charge`); a busy GPU costs `busy_cost_share` of its reference price per hour
  (power, cooling, wear). Net revenue is earnings less that cost.

Everything random is drawn per order before the run, from the seed alone, so every
strategy meets the same orders, caps and competitor prices.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpuprovider.domain.pricing import PriceTable
from gpuprovider.domain.resources import MILLI, GpuRequest, parse_gpu_request
from gpuprovider.market.baselines import TablePricing
from gpuprovider.market.model import MICROS, Order, OrderResources, charge
from gpuprovider.market.pricing import Pricing, Quote
from gpuprovider.market.sim import fleet as fleets
from gpuprovider.market.sim.hindsight import Bound, BoundOrder, lease_bound
from gpuprovider.market.sim.traces import Pod, default_traces, load_pods, load_prices
from gpuprovider.market.strategy import (
    LeaseView,
    Option,
    Outcome,
    Situation,
    Strategy,
    decide_safely,
    observe_safely,
    probe,
)
from gpuprovider.scheduler import Framework, Placement, policy
from gpuprovider.scheduler.model import NodeView, TaskRequest
from gpuprovider.scheduler.state import ClusterState

# openb's GPU models (anonymised G2/G3 included) onto the fleet's, by standing: T4 and
# P100 are the smallest, V100-16GB and A10 the middle, V100-32GB and G2 (openb's main
# 8-GPU servers) the large, G3 the newest.
OPENB_TO_FLEET = {
    "T4": "rtx-3090-24gb",
    "P100": "rtx-3090-24gb",
    "V100M16": "rtx-4090-24gb",
    "A10": "rtx-4090-24gb",
    "V100M32": "a100-80gb-sxm",
    "G2": "a100-80gb-sxm",
    "G3": "h100-80gb-sxm",
}
DURATION_LADDER_S = (3600, 6 * 3600, 86400, 3 * 86400, 7 * 86400, 30 * 86400, 366 * 86400)
MIN_RUN_S = 60.0
DECISION_EVERY, DECISIONS_KEPT = 97, 40  # the report shows a sample of decisions
LEASE_PRIORITY = 500  # the daemon's default [market] priority


@dataclass(frozen=True)
class LeaseScenario:
    hours: float = 24.0
    fleet: tuple[fleets.NodeGroup, ...] = fleets.DEFAULT_FLEET
    competitors: int = 3
    load: float = 0.9  # GPU demand offered / the market's GPUs
    trace: str = "gpuspec33"  # openb_pod_list_<trace>.csv
    cap_range: tuple[float, float] = (0.9, 1.6)
    competitor_range: tuple[float, float] = (0.85, 1.15)
    busy_cost_share: float = 0.3
    auction_window_s: float = 2.0
    policy: str = "best-fit"  # the daemon's default placement policy
    sample_s: float = 900.0
    traces: Path | None = None  # default: traces.default_traces()

    @property
    def horizon_s(self) -> float:
        return self.hours * 3600


@dataclass
class SimOrder:
    index: int
    order: Order
    arrival: float
    run_s: float  # how long it really runs (the provider never sees this)
    models: tuple[str, ...]  # fleet models it accepts, cheapest reference first
    requests: dict[str, TaskRequest]
    quotes: dict[str, Quote]
    competitor_factor: np.ndarray  # per competitor
    tie: np.ndarray  # per provider: tie-break order


@dataclass
class Market:
    """What every strategy's run shares: orders, prices, fleets."""

    scenario: LeaseScenario
    seed: int
    orders: list[SimOrder]
    reference: dict[str, float]  # USD per GPU-hour
    table: PriceTable
    market_gpus: int


def lease_request(order: Order, model: str) -> TaskRequest:
    """The scheduler's request for a lease's task on `model`, as the daemon makes it
    (`service.market.lease_spec` then `service.placement.task_request`)."""
    r = order.resources
    return TaskRequest(
        task_id=f"lease-{order.id}",
        gpu=_gpu_request(f"{model}:{r.gpus:g}" if r.gpus else "0"),
        cpu_milli=round(r.cpus * 1000),
        memory_mib=int(r.memory_gb * 1024),
        priority=LEASE_PRIORITY,
    )


_GPU_REQUESTS: dict[str, GpuRequest] = {}


def _gpu_request(text: str) -> GpuRequest:
    found = _GPU_REQUESTS.get(text)
    if found is None:
        found = _GPU_REQUESTS[text] = parse_gpu_request(text)
    return found


def declared_duration(run_s: float) -> int:
    return next(step for step in DURATION_LADDER_S if step >= run_s)


def prepare(scenario: LeaseScenario, seed: int) -> Market:
    folder = scenario.traces or default_traces()
    fleets.check(scenario.fleet)
    prices = load_prices(folder / "gpu-prices" / "reference-prices.csv")
    reference = fleets.gpu_prices(
        scenario.fleet, prices, fleets.REFERENCE_COLUMN, fleets.REFERENCE_FALLBACK
    )
    pods = load_pods(folder / "openb" / f"openb_pod_list_{scenario.trace}.csv")
    table = PriceTable(gpu_hour=reference, min_duration_s=60)
    per_provider = fleets.gpu_count(scenario.fleet)
    providers = 1 + scenario.competitors
    market = {m: n * providers for m, n in per_provider.items()}
    orders = make_orders(scenario, pods, reference, table, market, seed)
    return Market(scenario, seed, orders, reference, table, sum(market.values()))


def make_orders(
    scenario: LeaseScenario,
    pods: Sequence[Pod],
    reference: dict[str, float],
    table: PriceTable,
    market_gpus: dict[str, int],
    seed: int,
) -> list[SimOrder]:
    rng = np.random.default_rng([seed, 0xA])
    horizon = scenario.horizon_s
    gpu_pods = sorted((p for p in pods if p.gpus > 0), key=lambda p: (p.created_s, p.name))
    if not gpu_pods:
        raise ValueError("the trace has no pod that asks for a GPU")
    created = np.array([p.created_s for p in gpu_pods], dtype=np.float64)
    start = float(np.quantile(created, 0.02))  # the trace's first weeks are nearly empty
    end = float(created[-1])
    span = max(end - start, horizon)
    busy = sum(p.gpus * min(max(p.duration_s, MIN_RUN_S), horizon) for p in gpu_pods)
    per_window = busy / span  # GPUs a window of the horizon keeps busy, on average
    copies = max(1, round(scenario.load * sum(market_gpus.values()) / per_window))
    group_of = {g.model: g.gpus_per_node for g in scenario.fleet}
    draws: list[tuple[float, Pod, int]] = []
    for copy in range(copies):
        first = float(rng.uniform(start, max(start, end - horizon)))
        shift = float(rng.uniform(0, horizon))
        lo, hi = np.searchsorted(created, [first, first + horizon])
        for k in range(int(lo), int(hi)):
            draws.append(((created[k] - first + shift) % horizon, gpu_pods[k], copy))
    draws.sort(key=lambda d: (d[0], d[1].name, d[2]))
    n, k = len(draws), 1 + scenario.competitors
    cap_factor = rng.uniform(*scenario.cap_range, size=n)
    rival_factor = rng.uniform(*scenario.competitor_range, size=(n, scenario.competitors))
    ties = rng.random((n, k)).argsort(axis=1)
    picks = rng.random(n)
    pricing = Pricing(table)
    made: dict[tuple[str, tuple[str, ...]], tuple[Order, dict[str, Any], dict[str, Any]]] = {}
    orders = []
    for index, (arrival, pod, copy) in enumerate(draws):
        accepted = _accepted(pod, group_of, market_gpus, float(picks[index]))
        models = tuple(sorted(accepted, key=lambda m: (reference[m], m)))
        run_s = float(max(pod.duration_s, MIN_RUN_S))
        cheapest = reference[models[0]] if models else min(reference.values())
        cap = max(1, round(cheapest * pod.gpus * float(cap_factor[index]) * MICROS))
        template = made.get((pod.name, models))
        if template is None:  # validated once per pod and models; copies change id and cap
            order = Order(
                id=pod.name,
                resources=OrderResources(
                    gpus=pod.gpus,
                    gpu_model=models[0] if len(models) == 1 else "",
                    cpus=pod.cpu_milli / 1000,
                    memory_gb=pod.memory_mib / 1024,
                ),
                max_price_per_hour=cap,
                duration_s=declared_duration(run_s),
                payload={"command": ["true"]},
            )
            template = made[(pod.name, models)] = (
                order,
                {m: lease_request(order, m) for m in models},
                {m: pricing.quote(order, m) for m in models},
            )
        order = template[0].model_copy(
            update={"id": f"{pod.name}.{copy}", "max_price_per_hour": cap}
        )
        orders.append(
            SimOrder(
                index=index,
                order=order,
                arrival=float(arrival),
                run_s=run_s,
                models=models,
                requests=template[1],
                quotes=template[2],
                competitor_factor=rival_factor[index],
                tie=ties[index],
            )
        )
    return orders


def _accepted(
    pod: Pod, group_of: dict[str, int], market_gpus: dict[str, int], pick: float
) -> set[str]:
    if pod.gpu_spec:
        return {OPENB_TO_FLEET[s] for s in pod.gpu_spec if OPENB_TO_FLEET.get(s) in group_of}
    roomy = [m for m in sorted(market_gpus) if group_of[m] >= pod.num_gpu]
    if not roomy:
        return set()
    weights = np.cumsum([market_gpus[m] for m in roomy], dtype=np.float64)
    return {roomy[int(np.searchsorted(weights, pick * weights[-1], side="right"))]}


# -- competitors --------------------------------------------------------------------


class Rivals:
    """The K rival providers, each with the same nodes as this one, kept simple (no CPU or
    memory): whole GPUs go to the node with the fewest free GPUs that has enough, a share
    to the GPU with the least room that fits; each bids the reference price of the
    cheapest model it has room on now, times its own factor for the order (drawn before
    the run). All K are looked at together."""

    def __init__(self, count: int, fleet: Sequence[fleets.NodeGroup]):
        self.count = count
        self.free: dict[str, np.ndarray] = {}  # model -> milli free [rival, node, GPU]
        for group in fleet:
            block = np.full((group.nodes, group.gpus_per_node), MILLI, dtype=np.int64)
            held = self.free.get(group.model)
            self.free[group.model] = block if held is None else _stack(held, block)
        self.free = {m: np.repeat(f[None], count, axis=0) for m, f in self.free.items()}
        # whole free GPUs per rival and node (padding slots hold -1: never free)
        self.whole = {m: (f == MILLI).sum(axis=2) for m, f in self.free.items()}
        self.everyone = np.arange(count)

    def bids(self, so: SimOrder) -> list[tuple[int, str, tuple[int, np.ndarray], int]]:
        """(rival, model, (node, GPU slots), price) for each rival that bids."""
        gpus = so.order.resources.gpus
        looking = list(range(self.count))
        found = []
        for model in so.models:  # cheapest reference first
            free = self.free.get(model)
            if free is None or not looking:
                continue
            if gpus >= 1:
                whole = self.whole[model]
                masked = np.where(whole >= gpus, whole, MILLI)
                nodes = masked.argmin(axis=1)
                fits = masked[self.everyone, nodes] < MILLI
                slots = [(int(n), np.array([], dtype=np.int64)) for n in nodes]
            else:
                share = round(gpus * MILLI)
                room = np.where(free >= share, free, 2 * MILLI).reshape(self.count, -1)
                flat = room.argmin(axis=1)
                fits = room[self.everyone, flat] <= MILLI
                width = free.shape[2]
                slots = [(int(f) // width, np.array([int(f) % width])) for f in flat]
            for k in list(looking):
                if not fits[k]:
                    continue
                looking.remove(k)
                price = max(1, round(so.quotes[model].price_per_hour * so.competitor_factor[k]))
                if price > so.order.max_price_per_hour:
                    continue  # its price is over the cap: it does not bid
                node, taken = slots[k]
                if gpus >= 1:
                    taken = np.flatnonzero(free[k, node] == MILLI)[: int(gpus)]
                found.append((k, model, (node, taken), price))
        return found

    def take(
        self, k: int, model: str, taken: tuple[int, np.ndarray], gpus: float, sign: int = 1
    ) -> None:
        node, gpu_slots = taken
        row = self.free[model][k, node]
        amount = sign * (MILLI if gpus >= 1 else round(gpus * MILLI))
        whole = 0
        for j in gpu_slots.tolist():
            before = int(row[j])
            row[j] = before - amount
            whole += (before - amount == MILLI) - (before == MILLI)
        self.whole[model][k, node] += whole


def _stack(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    width = max(a.shape[1], b.shape[1])

    def pad(x: np.ndarray) -> np.ndarray:
        return np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=-1)

    return np.vstack([pad(a), pad(b)])


# -- the run -----------------------------------------------------------------------------


@dataclass
class Lease:
    id: str
    model: str
    placement: Placement
    price: int
    reference: int  # the price table's price for this order on this model
    gpus: float
    start: float
    end: float  # when it really ends


@dataclass
class Bid:
    provider: int
    price: int
    expires_at: float
    model: str
    placement: Placement
    live: bool = True


@dataclass
class SimProvider:
    name: str
    strategy: Strategy
    nodes: list[NodeView]
    framework: Framework
    state: ClusterState = field(init=False)
    leases: dict[str, Lease] = field(default_factory=dict)
    views: dict[str, LeaseView] = field(default_factory=dict)
    models: frozenset[str] = frozenset()
    gpus: int = 0
    revenue: int = 0  # micros, leases closed or cut at the horizon
    busy_gpu_s: dict[str, float] = field(default_factory=dict)
    seen: int = 0
    bids: int = 0
    won: int = 0
    errors: int = 0
    refused_fragmentation: int = 0
    ratios: list[float] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state = ClusterState(self.nodes)
        self.models = frozenset(g.model for n in self.nodes for g in n.gpus)
        self.gpus = sum(len(n.gpus) for n in self.nodes)

    def options(self, so: SimOrder) -> tuple[Option, ...]:
        """The order's options here, as the daemon would make them (`strategy.probe`)."""
        requests = {m: so.requests[m] for m in so.models if m in self.models}
        return probe(self.state, self.framework, requests, so.quotes)

    def offer(self, so: SimOrder, now: float, strategy: Strategy, fallback: Strategy) -> Bid | None:
        """Ask the strategy (safely) about the order; hold the placement of a bid."""
        options = self.options(so)
        self.seen += 1
        if options and not any(o.fits_now for o in options) and self.fragmented(so):
            self.refused_fragmentation += 1
        situation = Situation(so.order, now, options, self.state, self.views.values())
        choice = decide_safely(strategy, situation, fallback)
        self.errors += bool(choice.error)
        if self.seen % DECISION_EVERY == 1 and len(self.decisions) < DECISIONS_KEPT:
            self.decisions.append(
                {
                    "at_h": round(now / 3600, 3),
                    "order": so.order.id,
                    "gpus": so.order.resources.gpus,
                    "action": str(choice.decision.action),
                    "model": choice.model,
                    "price_per_hour": choice.decision.price_per_hour / MICROS,
                    "cap_per_hour": so.order.max_price_per_hour / MICROS,
                    "reason": choice.decision.reason[:300],
                }
            )
        if not choice.bids:
            return None
        option = next(o for o in options if o.model == choice.model)
        if option.placement is None:
            return None  # fits only once other work gave way: nothing to hold, no bid
        self.bids += 1
        self.hold(option.placement)
        d = choice.decision
        return Bid(0, d.price_per_hour, d.expires_at, option.model, option.placement)

    def hold(self, placement: Placement) -> None:
        node = self.state.index[placement.node_id]
        self.state.reserve(
            node,
            self.state.slots(node, placement.gpu_uuids),
            placement.gpu_milli,
            placement.cpu_milli,
            placement.memory_mib,
        )

    def fragmented(self, so: SimOrder) -> bool:
        """Whether the order fits this fleet's free GPUs added up, on some model it
        accepts, though no single node has room: refused for fragmentation."""
        state = self.state
        for model in so.models:
            if model not in state.models:
                continue
            code = state.models.index(model)
            of_model = (state.gpu_model == code) & state.gpu_usable
            request = so.requests[model].gpu
            if request.count:
                if int((of_model & (state.gpu_free == MILLI)).sum()) >= request.count:
                    return True
            elif int(state.gpu_free[of_model].sum()) >= request.share_milli:
                return True
        return False

    def accrued(self, now: float) -> int:
        running = sum(charge(lease.price, now - lease.start) for lease in self.leases.values())
        return self.revenue + running

    def busy_cost_usd(self, cost: dict[str, float], now: float | None = None) -> float:
        busy = dict(self.busy_gpu_s)
        if now is not None:
            for lease in self.leases.values():
                busy[lease.model] = busy.get(lease.model, 0.0) + lease.gpus * (now - lease.start)
        return sum(seconds / 3600 * cost[m] for m, seconds in busy.items())

    def busy_milli(self) -> int:
        return self.state.allocated_milli


@dataclass
class LeaseRun:
    strategy: str
    seed: int
    metrics: dict[str, float]
    series: dict[str, list[float]]
    decisions: list[dict[str, Any]] = field(default_factory=list)  # a sample, with their reasons


def run(market: Market, strategy: Strategy, fallback: Strategy | None = None) -> LeaseRun:
    """One run of the market with `strategy` as this provider."""
    scenario = market.scenario
    horizon = scenario.horizon_s
    cost = {m: scenario.busy_cost_share * price for m, price in market.reference.items()}
    fallback = fallback or TablePricing("built-in pricing")
    ours = SimProvider(
        "ours",
        strategy,
        fleets.build_nodes(scenario.fleet, "p0-"),
        Framework(policy(scenario.policy), seed=market.seed),
    )
    per_model = fleets.gpu_count(scenario.fleet)
    rivals = Rivals(scenario.competitors, scenario.fleet)
    events: list[tuple[float, int, int, Callable[[float], None]]] = []
    seq = 0
    bound_orders: list[BoundOrder] = []

    def push(at: float, kind: int, action: Callable[[float], None]) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (at, kind, seq, action))

    def end_lease(lease: Lease) -> Callable[[float], None]:
        def done(now: float) -> None:
            ours.state.unreserve(lease.placement)
            del ours.leases[lease.id]
            del ours.views[lease.id]
            ours.revenue += charge(lease.price, now - lease.start)
            ours.busy_gpu_s[lease.model] = ours.busy_gpu_s.get(lease.model, 0.0) + lease.gpus * (
                now - lease.start
            )

        return done

    def end_rival(
        k: int, model: str, taken: tuple[int, np.ndarray], gpus: float
    ) -> Callable[[float], None]:
        return lambda now: rivals.take(k, model, taken, gpus, -1)

    def expire(bid: Bid, so: SimOrder) -> Callable[[float], None]:
        def gone(now: float) -> None:
            if bid.live:
                bid.live = False
                ours.state.unreserve(bid.placement)
                observe_safely(strategy, Outcome(so.order.id, False, bid.price, now))

        return gone

    def close(
        so: SimOrder, mine: Bid | None, theirs: list[tuple[int, str, tuple[int, np.ndarray], int]]
    ) -> Callable[[float], None]:
        def decide(now: float) -> None:
            cap = so.order.max_price_per_hour
            offers = [(price, so.tie[k + 1], k) for k, _, _, price in theirs]
            if mine is not None and mine.live and mine.price <= cap:
                offers.append((mine.price, so.tie[0], -1))
            winner = min(offers)[2] if offers else None
            for k, model, taken, _ in theirs:
                if k == winner:
                    if so.arrival + so.run_s < horizon:
                        push(
                            now + so.run_s,
                            0,
                            end_rival(k, model, taken, so.order.resources.gpus),
                        )
                else:
                    rivals.take(k, model, taken, so.order.resources.gpus, -1)
            if mine is not None and mine.live:
                mine.live = False
                if winner == -1:
                    start_lease(so, mine, now)
                else:
                    ours.state.unreserve(mine.placement)
                observe_safely(strategy, Outcome(so.order.id, winner == -1, mine.price, now))
            rival = min((price for _, _, _, price in theirs), default=cap)
            note_bound(so, min(cap, rival), now)

        return decide

    def start_lease(so: SimOrder, bid: Bid, now: float) -> None:
        quote = so.quotes[bid.model]
        lease = Lease(
            so.order.id,
            bid.model,
            bid.placement,
            bid.price,
            quote.price_per_hour,
            so.order.resources.gpus,
            now,
            now + so.run_s,
        )
        ours.leases[lease.id] = lease
        ours.views[lease.id] = LeaseView(
            lease.id, lease.model, lease.gpus, lease.price, now, now + so.order.duration_s
        )
        ours.won += 1
        ours.ratios.append(bid.price / quote.price_per_hour)
        if lease.end < horizon:
            push(lease.end, 0, end_lease(lease))

    def note_bound(so: SimOrder, price: int, now: float) -> None:
        if ours.models.intersection(so.models):
            bound_orders.append(_bound_order(so, price, ours.models, cost, now, horizon))

    series: dict[str, list[float]] = {
        "t_h": [],
        "net_usd": [],
        "utilisation": [],
        "price_ratio": [],
    }
    next_sample = 0.0
    ratio_mark = 0

    def sample(now: float) -> None:
        nonlocal ratio_mark
        net = ours.accrued(now) / MICROS - ours.busy_cost_usd(cost, now)
        series["t_h"].append(round(now / 3600, 4))
        series["net_usd"].append(round(net, 4))
        series["utilisation"].append(round(ours.busy_milli() / (ours.gpus * MILLI), 4))
        recent = ours.ratios[ratio_mark:]
        series["price_ratio"].append(round(float(np.mean(recent)), 4) if recent else math.nan)
        ratio_mark = len(ours.ratios)

    orders = market.orders
    position = 0
    while position < len(orders) or events:
        at_order = orders[position].arrival if position < len(orders) else math.inf
        at_event = events[0][0] if events else math.inf
        now = min(at_order, at_event)
        if now >= horizon:
            break
        while next_sample <= now:
            sample(next_sample)
            next_sample += scenario.sample_s
        if at_event <= at_order:
            _, _, _, action = heapq.heappop(events)
            action(now)
            continue
        so = orders[position]
        position += 1
        theirs = rivals.bids(so)
        for k, model, taken, _ in theirs:
            rivals.take(k, model, taken, so.order.resources.gpus)
        mine = ours.offer(so, now, strategy, fallback)
        if mine is not None and mine.expires_at < now + scenario.auction_window_s:
            push(mine.expires_at, 1, expire(mine, so))
        if scenario.auction_window_s > 0:
            push(now + scenario.auction_window_s, 2, close(so, mine, theirs))
        else:
            close(so, mine, theirs)(now)
    while next_sample <= horizon:
        sample(next_sample)
        next_sample += scenario.sample_s
    for lease in list(ours.leases.values()):
        end_lease(lease)(horizon)
    bound = lease_bound(bound_orders, per_model, horizon)
    metrics = _metrics(ours, cost, horizon, bound)
    return LeaseRun(strategy.name, market.seed, metrics, series, ours.decisions)


def _bound_order(
    so: SimOrder,
    price: int,
    ours: frozenset[str],
    cost: dict[str, float],
    now: float,
    horizon: float,
) -> BoundOrder:
    """The order as hindsight sees it: it could have been won just under the lowest
    rival bid (at the cap when there was none) and run for its real duration."""
    end = min(now + so.run_s, horizon)
    hours = (end - now) / 3600
    gpus = so.order.resources.gpus
    values = {m: (price / MICROS - cost[m] * gpus) * hours for m in so.models if m in ours}
    return BoundOrder(now, end, gpus, values)


def _metrics(
    ours: SimProvider, cost: dict[str, float], horizon: float, bound: Bound
) -> dict[str, float]:
    gpu_hours = ours.gpus * horizon / 3600
    revenue = ours.revenue / MICROS
    net = revenue - ours.busy_cost_usd(cost)
    busy = sum(ours.busy_gpu_s.values())
    return {
        "net_revenue_per_gpu_hour": net / gpu_hours,
        "revenue_per_gpu_hour": revenue / gpu_hours,
        "utilisation": busy / (ours.gpus * horizon),
        "win_rate": ours.won / ours.bids if ours.bids else 0.0,
        "mean_price_over_reference": float(np.mean(ours.ratios)) if ours.ratios else math.nan,
        "refused_fragmentation": float(ours.refused_fragmentation),
        "orders": float(ours.seen),
        "bids": float(ours.bids),
        "won": float(ours.won),
        "strategy_errors": float(ours.errors),
        "hindsight_net_per_gpu_hour": bound.upper / gpu_hours,
        "hindsight_lower_per_gpu_hour": bound.lower / gpu_hours,
        # how much of that a node-blind bound owes to leases of 4 GPUs or more
        "hindsight_whole_node_share": bound.lower_big / bound.lower if bound.lower else 0.0,
        "regret": 1 - net / bound.upper if bound.upper > 0 else 0.0,
    }
