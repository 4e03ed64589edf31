"""Strategies and the market simulator: each baseline's rules on hand-made tiny markets,
the earnings strategy against hostile orders and markets, a strategy that raises, bad
traces and fleets, determinism per seed, and `market simulate`."""

import json
import math
import subprocess
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from gpuprovider.domain.pricing import PriceTable
from gpuprovider.domain.resources import parse_gpu_request
from gpuprovider.market.baselines import (
    AKASH_BID_VALID_S,
    AkashDefault,
    AkashStockPricing,
    GepettoDefault,
    Servers,
    TablePricing,
    Victims,
    akash_key,
    akash_mappings,
    gepetto_gain,
    gepetto_policy,
    gepetto_scale_down,
)
from gpuprovider.market.earnings import (
    EarningsApps,
    EarningsSettings,
    EarningsStrategy,
    _frag_growth,
)
from gpuprovider.market.model import MAX_MONEY, MICROS, Action, Cause, Decision, Order
from gpuprovider.market.pricing import Pricing, quote_table
from gpuprovider.market.sim import apps as app_sim
from gpuprovider.market.sim import fleet as fleets
from gpuprovider.market.sim import hindsight, lease
from gpuprovider.market.sim.report import line_chart, plain, render
from gpuprovider.market.sim.run import Scenario, simulate
from gpuprovider.market.sim.traces import TraceError, load_pods, load_prices, load_requests
from gpuprovider.market.strategies import UnknownStrategy, app_strategy, lease_strategy
from gpuprovider.market.strategy import (
    AppInfo,
    AppMarketView,
    Choice,
    Deployment,
    Mode,
    Option,
    Outcome,
    Reward,
    Situation,
    Step,
    decide_safely,
    probe,
)
from gpuprovider.scheduler import Framework, Placement, TaskRequest
from gpuprovider.scheduler import policy as scheduler_policy
from gpuprovider.scheduler.state import ClusterState
from gpuprovider.service.market import lease_spec
from gpuprovider.service.placement import task_request
from gpuprovider.testing import GPUPROVIDER

H100, A100, R3090 = "h100-80gb-sxm", "a100-80gb-sxm", "rtx-3090-24gb"
REFERENCE = {H100: 2.0, A100: 1.0, R3090: 0.25}
TABLE = PriceTable(gpu_hour=REFERENCE, min_duration_s=60)


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> Path:
    """Small made-up traces in the public ones' formats: 600 pods over ten days, an
    hour of requests for each Azure service, and the reference prices."""
    root = tmp_path_factory.mktemp("traces")
    rng = np.random.default_rng(0)
    rows = [POD_HEADER]
    specs = ["", "", "", "T4", "G2", "G3", "V100M16|V100M32"]
    for k in range(600):
        gpus = int(rng.choice([1, 1, 1, 1, 2, 4, 8]))
        milli = int(rng.choice([250, 500, 1000, 1000])) if gpus == 1 else 1000
        created = int(rng.uniform(0, 10 * 86400))
        run = int(min(rng.lognormal(7, 1.5), 86400))
        rows.append(
            f"pod-{k:04d},{int(rng.integers(1, 16)) * 1000},{int(rng.integers(4, 64)) * 1024},"
            f"{gpus},{milli},{specs[k % len(specs)]},{created},{created + run}"
        )
    (root / "openb").mkdir()
    (root / "openb" / "openb_pod_list_gpuspec33.csv").write_text("\n".join(rows) + "\n")
    (root / "azure-llm-2023").mkdir()
    for name, tokens in (("code", (2000, 30)), ("conv", (1000, 200))):
        lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
        for second in np.sort(rng.uniform(0, 3600, 400)):
            minute, sec = divmod(second, 60)
            lines.append(
                f"2023-11-16 18:{int(minute):02d}:{sec:09.6f},"
                f"{int(rng.integers(1, 2 * tokens[0]))},{int(rng.integers(1, 2 * tokens[1]))}"
            )
        (root / "azure-llm-2023" / f"AzureLLMInferenceTrace_{name}.csv").write_text(
            "\n".join(lines) + "\n"
        )
    (root / "gpu-prices").mkdir()
    (root / "gpu-prices" / "reference-prices.csv").write_text(
        "model,chutes_hourly_usd,vast_per_gpu_usd,akash_list_usd\n"
        "rtx-3090,0.3225,0.25,\nrtx-4090,0.5175,0.40,\na100-80gb,1.0125,0.73-1.20,1.71\n"
        "h100-sxm,1.83,1.80,2.71\nh200,2.7375,2.47,4.45\n"
    )
    return root


def order(gpus: float = 1, model: str = H100, cap: float = 4.0, duration_s: int = 3600, **more):
    return Order.model_validate(
        {
            "id": more.pop("id", "o1"),
            "resources": {"gpus": gpus, "gpu_model": model, "cpus": 2, "memory_gb": 8} | more,
            "max_price_per_hour": round(cap * MICROS),
            "duration_s": duration_s,
            "payload": {"command": ["true"]},
        }
    )


def cluster(*groups: tuple[str, int, int]) -> ClusterState:
    """Nodes of (model, nodes, GPUs per node)."""
    fleet = [fleets.NodeGroup(m, m, n, g, 64, 512) for m, n, g in groups]
    return ClusterState(fleets.build_nodes(fleet, "t-"))


def situation(o: Order, state: ClusterState, now: float = 0.0, mode=Mode.AUCTION) -> Situation:
    models = sorted({m for m in state.models if o.resources.accepts(m)})
    requests = {m: lease.lease_request(o, m) for m in models}
    quotes = {m: quote_table(TABLE, o, m) for m in models}
    options = probe(state, Framework(scheduler_policy("best-fit")), requests, quotes)
    return Situation(o, now, options, state, (), mode)


def fill(state: ClusterState, model: str, gpus_used: int) -> None:
    """Take `gpus_used` whole GPUs of `model`, node by node."""
    code = state.models.index(model)
    left = gpus_used
    for i in range(len(state)):
        if state.node_model[i] != code:
            continue
        free = [j for j in range(len(state.nodes[i].gpus)) if state.gpu_free[i, j] == 1000]
        take = free[:left]
        state.reserve(i, take, 1000, 0, 0)
        left -= len(take)


# -- akash-default ------------------------------------------------------------------------


def test_akash_stock_formula_prices_cpu_memory_and_mapped_gpus():
    pricing = AkashStockPricing({"h100.80gi": Decimal("1000")})
    q = pricing.quote(order(gpus=1, model=H100), H100)
    # 2 threads x 1.60 + 8 GB x 0.80 + 1 GPU x 1000, per month of 30.437 days
    month = Decimal("3.2") + Decimal("6.4") + Decimal("1000")
    assert q.price_per_hour == math.ceil(month / (Decimal("30.437") * 24) * MICROS)
    # the bare model name maps too; an unmapped model pays the highest mapped price
    assert AkashStockPricing({"h100": Decimal(1000)}).quote(order(), H100).price_per_hour == (
        q.price_per_hour
    )
    unknown = AkashStockPricing({"h100": Decimal(1000), "a100": Decimal(500)})
    assert unknown.quote(order(model=R3090), R3090).price_per_hour == q.price_per_hour
    # no mapping at all: $100 per GPU-month; a share pays a whole GPU (Akash's units)
    stock = AkashStockPricing()
    whole = stock.quote(order(gpus=1, model=R3090), R3090).price_per_hour
    assert stock.quote(order(gpus=0.5, model=R3090), R3090).price_per_hour == whole
    assert whole == math.ceil(
        (Decimal("3.2") + Decimal("6.4") + 100) / (Decimal("30.437") * 24) * MICROS
    )


def test_akash_mappings_come_from_the_price_table():
    mapped = akash_mappings(TABLE)
    assert akash_key(H100) == "h100.80gi"
    assert mapped["h100.80gi"] == Decimal("2.0") * Decimal("30.437") * 24


def test_akash_default_bids_on_every_order_that_fits_for_five_minutes():
    state = cluster((H100, 1, 2))
    akash = AkashDefault(AkashStockPricing(akash_mappings(TABLE)))
    bid = akash.decide(situation(order(), state, now=100.0))
    assert bid.decision.action == Action.BID and bid.model == H100
    assert bid.decision.expires_at == 100.0 + AKASH_BID_VALID_S == 400.0
    assert bid.decision.price_per_hour > 2 * MICROS  # GPU at its mapped price, plus CPU, memory
    fill(state, H100, 2)
    full = akash.decide(situation(order(), state))
    assert full.decision.action == Action.DECLINE and "does not fit now" in full.decision.reason
    assert full.decision.cause == Cause.CAPACITY
    cheap = akash.decide(situation(order(cap=1.0), cluster((H100, 1, 2))))
    assert cheap.decision.action == Action.DECLINE and "above the cap" in cheap.decision.reason
    assert cheap.decision.cause == Cause.PRICE


def tiny_market(
    specs: list[dict], groups=((H100, 1, 2),), competitors: int = 1, window: float = 2.0
) -> lease.Market:
    """A lease market made by hand: each spec has arrival, run_s, gpus, model, cap (USD
    per hour) and rivals (their factors on the reference price)."""
    fleet = tuple(fleets.NodeGroup(m, m, n, g, 64, 512) for m, n, g in groups)
    scenario = lease.LeaseScenario(
        hours=4, fleet=fleet, competitors=competitors, auction_window_s=window
    )
    pricing = Pricing(TABLE)
    orders = []
    for index, spec in enumerate(specs):
        o = order(spec.get("gpus", 1), spec["model"], spec["cap"], id=f"o{index}")
        models = (spec["model"],)
        orders.append(
            lease.SimOrder(
                index,
                o,
                spec["arrival"],
                spec["run_s"],
                models,
                {m: lease.lease_request(o, m) for m in models},
                {m: pricing.quote(o, m) for m in models},
                np.array(spec.get("rivals", [1.0] * competitors), dtype=float),
                np.arange(1 + competitors),
            )
        )
    gpus = sum(n * g for _, n, g in groups) * (1 + competitors)
    return lease.Market(scenario, 0, orders, dict(REFERENCE), TABLE, gpus)


def test_an_akash_bid_that_expires_before_the_tenant_decides_never_wins():
    """Bids last 5 minutes: a tenant that decides after 10 minutes finds none of them."""
    akash = lambda: AkashDefault(AkashStockPricing(akash_mappings(TABLE)))  # noqa: E731
    spec = [{"arrival": 0.0, "run_s": 3600.0, "model": H100, "cap": 4.0}]
    quick = lease.run(tiny_market(spec, competitors=0, window=2.0), akash())
    assert quick.metrics["won"] == 1
    slow = lease.run(tiny_market(spec, competitors=0, window=600.0), akash())
    assert slow.metrics["bids"] == 1 and slow.metrics["won"] == 0
    assert slow.metrics["utilisation"] == 0.0  # its hold was given back at the expiry


# -- swan-default -------------------------------------------------------------------------


def test_swan_default_accepts_when_the_offer_covers_the_table_for_resources_and_duration():
    table = PriceTable(gpu_hour={"h100": 2.0}, cpu_hour=0.05, memory_gb_hour=0.01)
    price = 2.0 + 2 * 0.05 + 8 * 0.01  # the GPU, 2 cores and 8 GB, per hour
    state = cluster((H100, 1, 2))
    swan = TablePricing()

    def answer(cap: float, duration_s: int = 3600) -> Choice:
        o = order(cap=cap, duration_s=duration_s)
        options = probe(
            state,
            Framework(scheduler_policy("best-fit")),
            {H100: lease.lease_request(o, H100)},
            {H100: quote_table(table, o, H100)},
        )
        return swan.decide(Situation(o, 0.0, options, state))

    covered = answer(price)
    assert covered.decision.action == Action.BID
    assert covered.decision.price_per_hour == round(price * MICROS)  # the table's, not the cap
    short = answer(price - 0.001)
    assert short.decision.action == Action.DECLINE and "the table asks" in short.decision.reason
    assert short.decision.cause == Cause.PRICE
    # a 30-second order is billed the table's minimum (60 s) and judged on that charge
    assert answer(price, duration_s=30).decision.action == Action.BID
    fill(state, H100, 2)
    assert answer(price * 2).decision.action == Action.DECLINE


# -- gepetto-default ------------------------------------------------------------------------

COST = {H100: 2.0, A100: 1.0, R3090: 0.3}


def app(app_id: str, **change) -> AppInfo:
    base = dict(
        app_id=app_id,
        gpu_count=1,
        models=frozenset({H100, A100, R3090}),
        instances=1,
        miners=1,
        capacity=8.0,
        compute_time_s=100.0,
        compute_multiplier=1.0,
        invocations=100.0,
        rate_limited=0.0,
        work_per_request_s=1.0,
        last_invoked_at=-math.inf,
    )
    return AppInfo(**(base | change))


def deployment(dep_id: str, app_id: str, node: str, model: str = A100, **change) -> Deployment:
    base = dict(
        id=dep_id,
        app_id=app_id,
        node_id=node,
        model=model,
        gpus=1,
        gpu_uuids=(f"{node}-0",),
        started_at=0.0,
        ready_at=0.0,
        last_invoked_at=-math.inf,
    )
    return Deployment(**(base | change))


def app_view(apps_, deployments=(), state=None, now=10_000.0) -> AppMarketView:
    return AppMarketView(
        now=now,
        window_s=3600,
        apps=list(apps_),
        deployments=list(deployments),
        cluster=state if state is not None else cluster((A100, 1, 8), (R3090, 2, 4)),
        hourly_cost=COST,
        speed={H100: 1.6, A100: 1.0, R3090: 0.46},
        multiplier={H100: 0.67, A100: 0.37, R3090: 0.12},
        weights={Reward.COMPUTE_UNITS: 0.55, Reward.INVOCATIONS: 0.25, Reward.UNIQUE_APPS: 0.2},
        concurrency=8,
    )


def test_gepetto_gain_credits_rate_limits_a_fifth_from_five_instances():
    busy = app("a", compute_time_s=100, compute_multiplier=2, invocations=50, rate_limited=10)
    # compute units 200, 4 per invocation, 10 limited: (200 + 40) / (1 + 1)
    assert gepetto_gain(busy) == pytest.approx(120)
    crowded = app(
        "a",
        instances=5,
        compute_time_s=100,
        compute_multiplier=2,
        invocations=50,
        rate_limited=10,
    )
    assert gepetto_gain(crowded) == pytest.approx((200 + 2 * 4) / 6)
    assert gepetto_gain(app("a", instances=0, compute_time_s=10)) == pytest.approx(10)


def test_gepetto_scales_up_the_single_app_of_highest_value_per_gpu_hour_cost():
    apps_ = [
        app("small", compute_time_s=100),  # one GPU: gain 50 / (0.3 x 1) on a 3090
        app("big", gpu_count=4, compute_time_s=300),  # gain 150 / (0.3 x 4)
        app("quiet", invocations=0, rate_limited=0, compute_time_s=500),  # no metrics
    ]
    # small: 50 / (0.3 x 1) = 167 beats big: 150 / (0.3 x 4) = 125, on the 3090s
    plan = GepettoDefault(COST).plan(app_view(apps_))
    assert [(a.step, a.app_id) for a in plan] == [(Step.SCALE_UP, "small")]
    assert "rtx-3090" in plan[0].reason


def test_gepetto_stops_at_three_local_instances_and_when_every_instance_is_its_own():
    mine = [deployment(f"d{k}", "hot", "t-rtx-3090-000", R3090) for k in range(3)]
    hot = app("hot", instances=3, compute_time_s=1000, rate_limited=50)
    assert GepettoDefault(COST).plan(app_view([hot], mine)) == []
    own = [deployment("d0", "solo", "t-rtx-3090-000", R3090)]
    solo = app("solo", instances=1, compute_time_s=1000)
    assert GepettoDefault(COST).plan(app_view([solo], own)) == []
    limited = app("solo", instances=1, compute_time_s=1000, rate_limited=5)
    assert [a.app_id for a in GepettoDefault(COST).plan(app_view([limited], own))] == ["solo"]


def test_gepetto_places_on_the_cheapest_server_then_the_fewest_free_gpus():
    state = cluster((A100, 1, 8), (R3090, 2, 4))
    fill(state, R3090, 1)  # the first 3090 node has 3 free, the second 4
    framework = Framework(gepetto_policy(COST))
    placed = framework.decide(state, TaskRequest("one", parse_gpu_request("1")))
    assert isinstance(placed, Placement) and placed.node_id == "t-rtx-3090-000"
    servers = Servers(app_view([], state=state))
    assert servers.best(frozenset({A100, R3090}), 4) == ("t-rtx-3090-001", R3090)
    assert servers.best(frozenset({A100, R3090}), 5) == ("t-a100-000", A100)


def test_gepetto_scales_down_the_costliest_fullest_server_older_than_five_minutes():
    state = cluster((A100, 1, 8), (R3090, 1, 4))
    fill(state, A100, 4)
    fill(state, R3090, 1)
    young = deployment("young", "x", "t-a100-000", A100, started_at=9_900.0)
    on_a100 = deployment("a", "x", "t-a100-000", A100)
    on_3090 = deployment("b", "x", "t-rtx-3090-000", R3090)
    view = app_view([app("x")], [young, on_a100, on_3090], state)
    # A100 server: 8 x 1.0 x 4/8 = 4; 3090 server: 4 x 0.3 x 1/4 = 0.3; young ones never
    assert gepetto_scale_down(view, "x").id == "a"


def test_gepetto_preempts_the_lowest_value_but_never_jobs_fresh_or_last_live_instances():
    now = 10_000.0
    apps_ = [
        app("cheap", compute_time_s=10, instances=2),
        app("dear", compute_time_s=1000, instances=1),
        app("live", compute_time_s=1, instances=1, last_invoked_at=now - 60),
        app("job", compute_time_s=0, instances=1),
        app("new", compute_time_s=0, instances=1),
    ]
    deps = [
        deployment("dear-1", "dear", "t-a100-000"),
        deployment("cheap-1", "cheap", "t-a100-000"),
        deployment("cheap-2", "cheap", "t-a100-000"),
        deployment("live-1", "live", "t-a100-000"),
        deployment("job-1", "job", "t-a100-000", job=True),
        deployment("new-1", "new", "t-a100-000", ready_at=now - 600),
    ]
    victims = Victims(app_view(apps_, deps, now=now))
    wanting = app("wanting", instances=0)
    assert victims.pick(wanting).app_id == "cheap"
    assert victims.pick(wanting).app_id == "cheap"
    assert victims.pick(wanting).app_id == "dear"  # live, job and new are never taken
    assert victims.pick(wanting) is None


def test_gepetto_claims_a_bounty_preempting_when_no_server_has_room():
    state = cluster((A100, 1, 2))
    fill(state, A100, 2)
    deps = [
        deployment("old", "stale", "t-a100-000"),
        deployment("old2", "stale", "t-a100-000", gpu_uuids=("t-a100-000-1",)),
    ]
    apps_ = [app("stale", instances=2, compute_time_s=5), app("wanted", instances=0, bounty=True)]
    plan = GepettoDefault(COST).plan(app_view(apps_, deps, state))
    assert [(a.step, a.app_id) for a in plan][:2] == [
        (Step.PREEMPT, "wanted"),
        (Step.SCALE_UP, "wanted"),
    ]
    assert plan[0].deployment_id in {"old", "old2"}


# -- the hindsight bound --------------------------------------------------------------


def test_the_hindsight_bound_finds_the_best_set_and_never_understates_it():
    # one GPU for two hours: a long lease worth 3, or two short ones worth 2 each
    orders = [
        hindsight.BoundOrder(0, 7200, 1, {H100: 3.0}),
        hindsight.BoundOrder(0, 3600, 1, {H100: 2.0}),
        hindsight.BoundOrder(3600, 7200, 1, {H100: 2.0}),
        hindsight.BoundOrder(0, 3600, 1, {H100: -1.0}),  # never worth running
    ]
    bound = hindsight.lease_bound(orders, {H100: 1}, 7200, slot_s=600)
    assert bound.lower == pytest.approx(4.0)
    assert 4.0 <= bound.upper <= 4.0 * 1.02
    # two models: an order goes to either, and each model's GPUs count apart (the
    # greedy set takes the first order's best model and so gets 5; the best set is 7)
    split = [
        hindsight.BoundOrder(0, 3600, 1, {H100: 5.0, A100: 4.0}),
        hindsight.BoundOrder(0, 3600, 1, {H100: 3.0}),
    ]
    both = hindsight.lease_bound(split, {H100: 1, A100: 1}, 3600, slot_s=600)
    assert both.lower == pytest.approx(5.0) and 7.0 <= both.upper <= 7.0 * 1.02


# -- the protocol: a strategy that fails ------------------------------------------------


class Raises:
    name = "raises"

    def decide(self, situation):
        raise RuntimeError("boom")

    def observe(self, outcome):
        raise RuntimeError("boom too")


class AboveCap:
    name = "greedy"

    def decide(self, situation):
        price = situation.order.max_price_per_hour + 1
        return Choice(Decision(Action.BID, "more", price), situation.options[0].model, self.name)

    def observe(self, outcome):
        return None


def test_a_strategy_that_raises_or_breaks_the_rules_falls_back_to_the_built_in_pricing():
    state = cluster((H100, 1, 2))
    s = situation(order(cap=4.0), state)
    fallback = TablePricing("built-in pricing")
    for broken, why in ((Raises(), "RuntimeError: boom"), (AboveCap(), "above the order's cap")):
        choice = decide_safely(broken, s, fallback)
        assert choice.decided_by == "built-in pricing" and why in choice.error
        assert choice.decision.action == Action.BID
        assert choice.decision.price_per_hour == 2 * MICROS
        assert choice.decision.reason.startswith(f"strategy {broken.name} failed")
    dispatched = decide_safely(Raises(), situation(order(), state, mode=Mode.DISPATCH), fallback)
    assert dispatched.decision.action == Action.ACCEPT


def test_the_simulator_survives_a_strategy_that_raises():
    spec = [
        {"arrival": 60.0 * k, "run_s": 1800.0, "model": H100, "cap": 3.0, "rivals": [1.2]}
        for k in range(6)
    ]
    broken = lease.run(tiny_market(spec), Raises())
    builtin = lease.run(tiny_market(spec), TablePricing("swan-default"))
    assert broken.metrics["strategy_errors"] == 6
    assert broken.metrics["won"] == builtin.metrics["won"] > 0
    assert broken.metrics["net_revenue_per_gpu_hour"] == builtin.metrics["net_revenue_per_gpu_hour"]


# -- earnings -----------------------------------------------------------------------


def earnings(**settings) -> EarningsStrategy:
    return EarningsStrategy(
        {m: 0.3 * p for m, p in REFERENCE.items()}, EarningsSettings(**settings)
    )


def test_earnings_asks_more_for_its_last_free_gpus_than_for_idle_ones():
    idle = cluster((A100, 2, 8))
    busy = cluster((A100, 2, 8))
    fill(busy, A100, 14)
    o = order(model="a100", cap=3.0)
    cheap = earnings().decide(situation(o, idle))
    dear = earnings().decide(situation(o, busy))
    assert cheap.decision.action == dear.decision.action == Action.BID
    assert dear.decision.price_per_hour > cheap.decision.price_per_hour
    assert "opportunity" in dear.decision.reason and "94% used" in dear.decision.reason


def test_earnings_bids_within_bounds_whatever_the_order_says():
    state = cluster((H100, 1, 8))
    greedy = earnings().decide(situation(order(cap=MAX_MONEY / MICROS), state))
    assert greedy.decision.action == Action.BID
    assert greedy.decision.price_per_hour <= 3 * 2 * MICROS  # at most 3x the list price
    stingy = earnings().decide(situation(order(cap=0.5), state))  # under the busy cost
    assert stingy.decision.action == Action.DECLINE and "cap" in stingy.decision.reason
    assert stingy.decision.cause == Cause.PRICE


def test_a_market_that_only_reports_losses_cannot_push_earnings_below_its_costs():
    """A hostile hub answering `lost` to every bid drives the odds down, never the price
    under what a working GPU costs."""
    # a working H100 costs 1.5 of its 2.0 list price: the odds alone would go lower
    strategy = EarningsStrategy({H100: 1.5}, EarningsSettings(half_life_s=3600))
    state = cluster((H100, 1, 8))
    prices = []
    for k in range(400):
        choice = strategy.decide(situation(order(cap=10.0, id=f"o{k}"), state, now=float(k)))
        if choice.bids:
            prices.append(choice.decision.price_per_hour)
            strategy.observe(Outcome(f"o{k}", False, choice.decision.price_per_hour, float(k)))
    assert len(prices) > 100 and min(prices) > 1.5 * MICROS  # above the busy cost, always


def test_a_market_that_never_answers_cannot_fill_earnings_memory():
    strategy = earnings(pending_max=10)
    state = cluster((H100, 1, 8))
    for k in range(50):
        strategy.decide(situation(order(cap=4.0, id=f"o{k}"), state, now=float(k)))
    assert (
        len(strategy.pending) == 10 and "o49" in strategy.pending and "o0" not in strategy.pending
    )
    strategy.observe(Outcome("o0", True, 1, 50.0))  # forgotten: nothing to learn, no error


def test_earnings_learns_to_ask_more_where_it_keeps_winning():
    strategy = earnings()
    state = cluster((H100, 1, 8))
    first = strategy.decide(situation(order(cap=10.0, id="start"), state)).decision.price_per_hour
    for k in range(300):
        choice = strategy.decide(situation(order(cap=10.0, id=f"w{k}"), state, now=float(k)))
        strategy.observe(Outcome(f"w{k}", True, choice.decision.price_per_hour, float(k)))
    later = strategy.decide(situation(order(cap=10.0, id="end"), state, now=300.0))
    assert later.decision.price_per_hour > first


def test_breaking_a_clean_node_costs_more_fragmentation_than_filling_a_gap():
    state = cluster((A100, 2, 8))
    fill(state, A100, 7)  # node 0: one GPU left; node 1: clean
    strategy = earnings()
    for k in range(20):  # the orders seen: whole-node jobs, worth a lot
        strategy.decide(situation(order(gpus=8, model="a100", cap=20.0, id=f"big{k}"), state))
    typical = strategy._typical(state)[A100]
    small = lease.lease_request(order(model="a100"), A100)
    gap = Placement("s", "t-a100-000", ("t-a100-000-7",), 1000, 2000, 8192)
    clean = Placement("s", "t-a100-001", ("t-a100-001-0",), 1000, 2000, 8192)
    broken = _frag_growth(typical, state, Option(A100, small, clean))
    filled = _frag_growth(typical, state, Option(A100, small, gap))
    assert broken == pytest.approx(7000) and filled == pytest.approx(-1000)


def test_earnings_app_strategy_serves_what_nobody_serves_and_never_preempts_a_serving_instance():
    state = cluster((A100, 1, 2))
    apps_ = [
        app("crowded", instances=6, miners=5, capacity=48.0, invocations=600),
        app("orphan", instances=0, miners=0, capacity=0.0, invocations=0, rate_limited=300),
    ]
    plan = EarningsApps().plan(app_view(apps_, state=state, now=4000.0))
    assert next(a.app_id for a in plan if a.step == Step.SCALE_UP) == "orphan"
    # full, and its one instance served a minute ago: nothing is stopped
    fill(state, A100, 2)
    serving = [deployment("d", "crowded", "t-a100-000", last_invoked_at=3940.0)]
    assert EarningsApps().plan(app_view(apps_, serving, state, now=4000.0)) == []


# -- the simulator ------------------------------------------------------------------------


def test_lease_tasks_are_the_daemons_own():
    o = order(gpus=0.5, model="h100")
    spec = lease_spec(o.id, o, H100, 500, "hub")
    ours = lease.lease_request(o, H100)
    theirs = task_request(f"lease-{o.id}", spec)
    assert (ours.gpu, ours.cpu_milli, ours.memory_mib, ours.priority) == (
        theirs.gpu,
        theirs.cpu_milli,
        theirs.memory_mib,
        theirs.priority,
    )


def test_orders_declare_a_duration_never_shorter_than_they_run(traces):
    market = lease.prepare(lease.LeaseScenario(hours=1, traces=traces), 7)
    assert market.orders
    for so in market.orders[:500]:
        assert so.order.duration_s >= so.run_s and so.order.duration_s in lease.DURATION_LADDER_S
        assert so.order.max_price_per_hour > 0 and so.models


@pytest.mark.slow
def test_the_simulator_is_deterministic_per_seed(traces):
    first = simulate(Scenario.A, 3, ["swan-default", "earnings"], hours=1, traces=traces)
    again = simulate(Scenario.A, 3, ["swan-default", "earnings"], hours=1, traces=traces)
    other = simulate(Scenario.A, 4, ["earnings"], hours=1, traces=traces)
    for name in ("swan-default", "earnings"):
        a, b = first["strategies"][name], again["strategies"][name]
        strip = lambda m: {k: v for k, v in m.items() if k not in ("wall_s", "cpu_s")}  # noqa: E731
        assert strip(a["metrics"]) == strip(b["metrics"]) and a["series"] == b["series"]
    assert strip(other["strategies"]["earnings"]["metrics"]) != strip(
        first["strategies"]["earnings"]["metrics"]
    )
    b1 = simulate(Scenario.B, 3, ["earnings"], hours=0.5, traces=traces)
    b2 = simulate(Scenario.B, 3, ["earnings"], hours=0.5, traces=traces)
    assert strip(b1["strategies"]["earnings"]["metrics"]) == strip(
        b2["strategies"]["earnings"]["metrics"]
    )


def test_an_app_strategy_that_raises_does_nothing_and_is_counted(traces):
    class Broken:
        name = "broken"
        policy = scheduler_policy("best-fit")

        def plan(self, view):
            raise RuntimeError("boom")

    scenario = app_sim.AppScenario(hours=0.25, warmup_hours=0.0, apps=10, traces=traces)
    run = app_sim.run_apps(app_sim.prepare_apps(scenario, 1), Broken())
    assert run.metrics["strategy_errors"] == app_sim.AppScenario(hours=0.25).ticks
    assert run.metrics["score_share"] == 0.0 and run.metrics["cold_starts"] == 0


def test_unknown_strategies_are_refused_by_name():
    with pytest.raises(UnknownStrategy, match="choose one of akash-default, swan-default"):
        lease_strategy("aggressive", TABLE)
    with pytest.raises(UnknownStrategy, match="gepetto-default"):
        app_strategy("akash-default", COST)


# -- bad input ----------------------------------------------------------------------------

POD_HEADER = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,creation_time,deletion_time"


def test_a_pod_trace_missing_columns_or_with_negative_durations_is_refused_by_row(tmp_path):
    path = tmp_path / "pods.csv"
    path.write_text("name,cpu_milli,num_gpu\npod-a,1000,1\n")
    with pytest.raises(TraceError, match=r"pods\.csv: missing columns memory_mib, gpu_milli"):
        load_pods(path)
    path.write_text(f"{POD_HEADER}\npod-a,1000,1024,1,1000,,0,10\npod-b,1000,1024,1,1000,,50,20\n")
    with pytest.raises(TraceError, match=r"row 2 \(pod-b\): negative duration"):
        load_pods(path)
    path.write_text(f"{POD_HEADER}\npod-a,lots,1024,1,1000,,0,10\n")
    with pytest.raises(TraceError, match="row 1: cpu_milli is 'lots', not an integer"):
        load_pods(path)
    path.write_text(f"{POD_HEADER}\npod-a,1000,1024,1,1500,,0,10\n")
    with pytest.raises(TraceError, match="row 1: gpu_milli is above 1000"):
        load_pods(path)


def test_a_request_trace_missing_columns_or_with_bad_rows_is_refused_by_row(tmp_path):
    path = tmp_path / "AzureLLMInferenceTrace_x.csv"
    path.write_text("TIMESTAMP,ContextTokens\n2023-11-16 18:00:00,10\n")
    with pytest.raises(TraceError, match="missing column GeneratedTokens"):
        load_requests(path)
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00,10,5\nyesterday,1,1\n"
    )
    with pytest.raises(TraceError, match="row 2: TIMESTAMP is 'yesterday'"):
        load_requests(path)
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00,10,-5\n")
    with pytest.raises(TraceError, match="row 1: GeneratedTokens is negative"):
        load_requests(path)


def test_a_fleet_model_without_a_price_is_refused_by_key(tmp_path):
    path = tmp_path / "prices.csv"
    path.write_text(
        "model,chutes_hourly_usd,vast_per_gpu_usd\nh100-sxm,1.83,1.80\nrtx-3090,,0.25\n"
    )
    prices = load_prices(path)
    assert prices["vast_per_gpu_usd"] == {"h100-sxm": 1.8, "rtx-3090": 0.25}
    fleet = [
        fleets.NodeGroup(H100, "h100-sxm", 1, 8, 64, 512),
        fleets.NodeGroup("rtx-4090-24gb", "rtx-4090", 1, 4, 64, 512),
    ]
    with pytest.raises(fleets.FleetError, match="rtx-4090-24gb: no price for key 'rtx-4090'"):
        fleets.gpu_prices(fleet, prices, "vast_per_gpu_usd", "chutes_hourly_usd")
    path.write_text("model,vast_per_gpu_usd\nh100-sxm,cheap\n")
    with pytest.raises(TraceError, match=r"row 1 \(h100-sxm\): vast_per_gpu_usd is 'cheap'"):
        load_prices(path)
    with pytest.raises(fleets.FleetError, match="not a catalogue model id"):
        fleets.check([fleets.NodeGroup("h900", "h900", 1, 8, 64, 512)])


# -- the report and the command --------------------------------------------------------


def test_the_report_is_self_contained_and_its_json_has_no_nan():
    series = {"t_h": [0.0, 1.0, 2.0], "net_usd": [0.0, math.nan, 2.0]}
    svg = line_chart("x", {"a": series["t_h"]}, {"a": series["net_usd"]}, "USD")
    assert svg.startswith("<svg") and "polyline" not in svg and svg.count("<circle") == 2
    report = {
        "scenario": "A",
        "seed": 1,
        "strategies": {
            "a": {
                "metrics": {"regret": math.nan},
                "series": {**series, "utilisation": [0, 1, 1], "price_ratio": [1, 1, 1]},
            }
        },
    }
    page = render(report)
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert json.loads(json.dumps(plain(report), allow_nan=False))["strategies"]["a"]["metrics"] == {
        "regret": None
    }


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([GPUPROVIDER, *args], capture_output=True, text=True)


@pytest.mark.slow
def test_market_simulate_writes_a_report(tmp_path, traces):
    out, where = ["--out", str(tmp_path)], ["--traces", str(traces)]
    ran = cli(
        "market", "simulate", "--scenario", "a", "--seed", "2", "--hours", "0.5", *where, *out
    )
    assert ran.returncode == 0, ran.stderr
    data = json.loads((tmp_path / "market-A-seed2.json").read_text())
    assert set(data["strategies"]) == {"akash-default", "swan-default", "earnings"}
    page = (tmp_path / "market-A-seed2.html").read_text()
    assert page.count("<svg") == 3 and "<script" not in page
    bad = cli("market", "simulate", "--scenario", "C")
    assert bad.returncode == 2 and "unknown scenario 'C'" in bad.stderr
    unknown = cli("market", "simulate", "--strategy", "gepetto-default", *where, *out)
    assert unknown.returncode == 2
    assert "scenario A has no strategy 'gepetto-default'" in unknown.stderr
