"""Scenario B: an inference-app market (Chutes-like) made from the Azure LLM traces,
on a virtual clock ticking every 15 s (gepetto's cadence).

- *Apps*: `apps` of them. Each has a GPU count per instance (1, 2, 4 or 8), the GPU
  models it runs on (any, 80 GB ones, or H100 only), a cold start (2-5 minutes plus a
  minute per GPU: loading the model), and a request stream: one of the two Azure
  traces (code completion or conversation), its hour replayed with a fresh random shift
  every hour, scaled by a Zipf popularity (rank r weighs 1/r^zipf_s) so that all apps
  together offer `demand` times the market's instance capacity.
- *Work*: a request costs (context tokens / prefill rate + generated tokens / decode
  rate) seconds on the reference GPU (A100); on another GPU, that over its speed (memory
  bandwidth relative to the A100's: decoding is bandwidth bound).
- *Validator*: each tick spreads an app's requests over its ready instances in
  proportion to what they can serve (`concurrency` requests at once each, at their
  GPU's speed; least-connections routing does this in steady state); what is beyond
  their capacity is rate-limited. An app invoked with no instance anywhere posts a
  bounty. It publishes per app, over the last `window_s`: instances, miners running it,
  compute time, compute multiplier, invocations, rate-limited requests.
- *Rewards*: a miner's compute units (compute time x its GPU's compute multiplier x
  GPUs per instance; the multiplier is Chutes' hourly rate over the highest rate),
  invocations, and unique apps (apps with a ready instance of it, averaged over time);
  each as its share of the market's total, weighted by `weights` (Chutes' published
  weights without bounties: 0.55, 0.25, 0.20). The first `warmup_hours` (every miner
  starts empty) count for nothing.
- *Miners*: `miners` competitors running gepetto-default, and this miner running the
  strategy under test; each has the same fleet, placed by gpuprovider's scheduler with
  its strategy's policy. A miner pays for its fleet all the time: score share per dollar
  is its score share over its fleet's cost (Chutes' hourly rates).

Everything random is drawn before the run from the seed alone: every strategy meets
the same apps and requests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpuprovider.domain import catalogue
from gpuprovider.domain.resources import MILLI, GpuRequest
from gpuprovider.market.baselines import GepettoDefault
from gpuprovider.market.sim import fleet as fleets
from gpuprovider.market.sim.traces import (
    PriceColumn,
    Requests,
    default_traces,
    load_prices,
    load_requests,
)
from gpuprovider.market.strategy import (
    AppAction,
    AppInfo,
    AppMarketView,
    AppStrategy,
    Deployment,
    Reward,
    Step,
)
from gpuprovider.scheduler import Framework, Placement
from gpuprovider.scheduler.model import TaskRequest
from gpuprovider.scheduler.state import ClusterState

REFERENCE_GPU = "a100-80gb-sxm"
WEIGHTS = {Reward.COMPUTE_UNITS: 0.55, Reward.INVOCATIONS: 0.25, Reward.UNIQUE_APPS: 0.20}
RECENT_S = 600.0
DECISIONS_KEPT = 40  # an instance invoked this recently is serving (preemption counts it)


@dataclass(frozen=True)
class AppScenario:
    hours: float = 24.0
    warmup_hours: float = 1.0
    apps: int = 100
    zipf_s: float = 1.0
    miners: int = 4  # competitors, each running gepetto-default
    fleet: tuple[fleets.NodeGroup, ...] = fleets.DEFAULT_FLEET
    tick_s: float = 15.0
    window_s: float = 3600.0
    concurrency: int = 8
    demand: float = 0.5  # work offered / the market's instance capacity
    prefill_tokens_s: float = 5000.0  # on the reference GPU
    decode_tokens_s: float = 40.0  # per request on the reference GPU
    gpu_counts: tuple[tuple[int, float], ...] = ((1, 0.55), (2, 0.25), (4, 0.15), (8, 0.05))
    weights: tuple[tuple[Reward, float], ...] = tuple(WEIGHTS.items())
    sample_s: float = 900.0
    traces: Path | None = None

    @property
    def ticks(self) -> int:
        return round(self.hours * 3600 / self.tick_s)


@dataclass(frozen=True)
class App:
    id: str
    gpu_count: int
    models: frozenset[str]
    cold_start_s: float
    trace: int  # index into AppMarket.traces
    scale: float  # requests per trace request
    request: TaskRequest


@dataclass
class AppMarket:
    scenario: AppScenario
    seed: int
    apps: list[App]
    # per app and tick: requests arriving and their work (reference GPU-seconds)
    requests: np.ndarray
    work: np.ndarray
    speed: dict[str, float]
    multiplier: dict[str, float]
    hourly_cost: dict[str, float]


def prepare_apps(scenario: AppScenario, seed: int) -> AppMarket:
    folder = scenario.traces or default_traces()
    fleets.check(scenario.fleet)
    prices = load_prices(folder / "gpu-prices" / "reference-prices.csv")
    hourly = fleets.gpu_prices(scenario.fleet, prices, PriceColumn.CHUTES)
    top = max(prices[PriceColumn.CHUTES].values())
    multiplier = {m: rate / top for m, rate in hourly.items()}
    bandwidth = {m: catalogue.models()[m].bandwidth_gbs for m in hourly}
    reference = catalogue.models()[REFERENCE_GPU].bandwidth_gbs
    speed = {m: bw / reference for m, bw in bandwidth.items()}
    streams = [
        load_requests(folder / "azure-llm-2023" / f"AzureLLMInferenceTrace_{name}.csv")
        for name in ("code", "conv")
    ]
    rng = np.random.default_rng([seed, 0xB])
    group_of = {g.model: g.gpus_per_node for g in scenario.fleet}
    models = sorted(group_of)
    big = sorted(m for m in models if catalogue.models()[m].memory_gb >= 80)
    newest = sorted(m for m in big if catalogue.models()[m].family == "h100") or big
    tiers = [(frozenset(models), 0.5), (frozenset(big), 0.35), (frozenset(newest), 0.15)]
    counts, count_p = zip(*scenario.gpu_counts, strict=True)
    ranks = rng.permutation(scenario.apps)
    popularity = 1 / (ranks + 1.0) ** scenario.zipf_s
    binned = [_bin(s, scenario) for s in streams]
    apps: list[App] = []
    for i in range(scenario.apps):
        tier = tiers[int(rng.choice(len(tiers), p=[p for _, p in tiers]))][0]
        gpu_count = int(rng.choice(counts, p=np.array(count_p) / sum(count_p)))
        hosts = frozenset(m for m in tier if group_of[m] >= gpu_count)
        if not hosts:
            hosts = frozenset(m for m in models if group_of[m] >= gpu_count)
        app_id = f"app-{i:03d}"
        apps.append(
            App(
                app_id,
                gpu_count,
                hosts,
                float(rng.uniform(120, 300)) + 60 * gpu_count,
                int(rng.integers(len(streams))),
                1.0,
                TaskRequest(
                    app_id,
                    GpuRequest(count=gpu_count, models=hosts, model_text="|".join(sorted(hosts))),
                ),
            )
        )
    # scale: popularity shares of the work that `demand` of the capacity can serve
    per_instance = {m: scenario.concurrency * speed[m] for m in models}
    gpus = fleets.gpu_count(scenario.fleet)
    market_gpus = sum(gpus.values()) * (1 + scenario.miners)
    mean_speed = sum(per_instance[m] * n for m, n in gpus.items()) / sum(gpus.values())
    mean_count = float(np.dot(counts, count_p) / sum(count_p))
    capacity = market_gpus / mean_count * mean_speed  # reference work per second
    shares = popularity / popularity.sum()
    ticks = scenario.ticks
    requests = np.zeros((len(apps), ticks))
    work = np.zeros((len(apps), ticks))
    per_hour = round(3600 / scenario.tick_s)
    for i, app in enumerate(apps):
        counts_b, work_b = binned[app.trace]
        rate = work_b.sum() / (len(work_b) * scenario.tick_s)  # work per second at scale 1
        scale = scenario.demand * capacity * shares[i] / rate
        shifts = rng.integers(len(work_b), size=ticks // per_hour + 1)
        index = (np.arange(ticks) % len(work_b) + np.repeat(shifts, per_hour)[:ticks]) % len(work_b)
        requests[i] = counts_b[index] * scale
        work[i] = work_b[index] * scale
        apps[i] = App(
            app.id, app.gpu_count, app.models, app.cold_start_s, app.trace, scale, app.request
        )
    return AppMarket(scenario, seed, apps, requests, work, speed, multiplier, hourly)


def _bin(stream: Requests, scenario: AppScenario) -> tuple[np.ndarray, np.ndarray]:
    """Requests and work per tick over the trace's span, whole ticks only."""
    bins = max(1, int(stream.span_s // scenario.tick_s))
    at = np.minimum((stream.at_s // scenario.tick_s).astype(np.int64), bins - 1)
    seconds = (
        stream.context_tokens / scenario.prefill_tokens_s
        + stream.generated_tokens / scenario.decode_tokens_s
    )
    return (
        np.bincount(at, minlength=bins).astype(np.float64),
        np.bincount(at, weights=seconds, minlength=bins),
    )


# -- the run ----------------------------------------------------------------------------


@dataclass
class Instance:
    id: str
    miner: int
    app: int
    model: str
    gpus: int
    placement: Placement
    started_at: float
    ready_at: float
    last_invoked_at: float = -math.inf
    served: float = 0.0  # requests served, all time


@dataclass
class Miner:
    index: int
    strategy: AppStrategy
    state: ClusterState
    framework: Framework
    gpus: int
    compute_units: float = 0.0
    invocations: float = 0.0
    unique_s: float = 0.0  # apps with a ready instance x seconds
    cold_starts: int = 0
    preemptions: int = 0
    scale_downs: int = 0
    refused: int = 0  # scale-ups the scheduler could not place
    errors: int = 0
    held_gpu_s: float = 0.0
    series: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class AppRun:
    strategy: str
    seed: int
    metrics: dict[str, float]
    series: dict[str, list[float]]
    decisions: list[dict[str, Any]] = field(default_factory=list)  # this miner's first actions


def run_apps(market: AppMarket, strategy: AppStrategy) -> AppRun:
    """One run with `strategy` as this miner (index 0) among gepetto-default miners."""
    sc = market.scenario
    tick = sc.tick_s
    weights = dict(sc.weights)
    miners: list[Miner] = []
    for k in range(1 + sc.miners):
        plan = strategy if k == 0 else GepettoDefault(market.hourly_cost)
        nodes = fleets.build_nodes(sc.fleet, f"m{k}-")
        miners.append(
            Miner(
                k,
                plan,
                ClusterState(nodes),
                Framework(plan.policy, seed=market.seed),
                sum(len(n.gpus) for n in nodes),
            )
        )
    apps = market.apps
    n_apps = len(apps)
    window = round(sc.window_s / tick)
    ring = {
        name: np.zeros((n_apps, window))
        for name in ("compute_time", "compute_units", "invocations", "rate_limited", "requests")
    }
    sums = {name: np.zeros(n_apps) for name in ring}
    last_invoked = np.full(n_apps, -math.inf)
    instances: dict[str, Instance] = {}
    decisions: list[dict[str, Any]] = []
    serial = 0
    warmup = sc.warmup_hours * 3600
    series: dict[str, list[float]] = {"t_h": [], "score": [], "utilisation": [], "cu_per_hour": []}
    next_sample = 0.0
    last_cu = 0.0
    totals = {r: 0.0 for r in Reward}
    gpu_count = np.array([a.gpu_count for a in apps])
    work_per_request = np.divide(
        market.work.sum(axis=1),
        market.requests.sum(axis=1),
        out=np.ones(n_apps),
        where=market.requests.sum(axis=1) > 0,
    )

    for t in range(sc.ticks):
        now = t * tick
        slot = t % window
        # -- the validator routes this tick's requests -----------------------------------
        ready = [i for i in instances.values() if i.ready_at <= now]
        app_of = np.array([i.app for i in ready], dtype=np.int64)
        speed = np.array([market.speed[i.model] for i in ready])
        capacity = sc.concurrency * tick * speed
        room = (
            np.bincount(app_of, weights=capacity, minlength=n_apps) if ready else np.zeros(n_apps)
        )
        work = market.work[:, t]
        asked = market.requests[:, t]
        served_work = np.minimum(work, room)
        served_frac = np.divide(served_work, work, out=np.zeros(n_apps), where=work > 0)
        limited = asked * (1 - served_frac)
        compute_time: np.ndarray = np.zeros(n_apps)
        compute_units: np.ndarray = np.zeros(n_apps)
        counted = now >= warmup
        if ready:
            share = np.divide(
                capacity, room[app_of], out=np.zeros(len(ready)), where=room[app_of] > 0
            )
            inst_work = served_work[app_of] * share
            inst_time = inst_work / speed
            mult = np.array([market.multiplier[i.model] for i in ready]) * gpu_count[app_of]
            inst_cu = inst_time * mult
            inst_inv = asked[app_of] * served_frac[app_of] * share
            compute_time = np.bincount(app_of, weights=inst_time, minlength=n_apps)
            compute_units = np.bincount(app_of, weights=inst_cu, minlength=n_apps)
            by_miner = np.array([i.miner for i in ready])
            if counted:
                cu_m = np.bincount(by_miner, weights=inst_cu, minlength=len(miners))
                inv_m = np.bincount(by_miner, weights=inst_inv, minlength=len(miners))
                for m in miners:
                    m.compute_units += float(cu_m[m.index])
                    m.invocations += float(inv_m[m.index])
            for inst, inv in zip(ready, inst_inv.tolist(), strict=True):
                if inv > 0:
                    inst.served += inv
                    inst.last_invoked_at = now
            if counted:
                seen: set[tuple[int, int]] = {(i.miner, i.app) for i in ready}
                unique = np.bincount([m for m, _ in seen], minlength=len(miners))
                for m in miners:
                    m.unique_s += float(unique[m.index]) * tick
        last_invoked[served_work > 0] = now
        for name, values in (
            ("compute_time", compute_time),
            ("compute_units", compute_units),
            ("invocations", asked * served_frac),
            ("rate_limited", limited),
            ("requests", asked),
        ):
            sums[name] += values - ring[name][:, slot]
            ring[name][:, slot] = values
        if counted:
            for m in miners:
                m.held_gpu_s += (m.state.allocated_milli / MILLI) * tick
        # -- the validator's figures, then each miner plans -------------------------------
        live = list(instances.values())
        inst_count = (
            np.bincount([i.app for i in live], minlength=n_apps)
            if live
            else np.zeros(n_apps, dtype=np.int64)
        )
        miners_on = np.zeros(n_apps, dtype=np.int64)
        for app_index in {(i.miner, i.app) for i in live}:
            miners_on[app_index[1]] += 1
        all_capacity = np.zeros(n_apps)
        for i in live:
            all_capacity[i.app] += sc.concurrency * market.speed[i.model]
        infos = []
        for a, app in enumerate(apps):
            ct = float(sums["compute_time"][a])
            infos.append(
                AppInfo(
                    app.id,
                    app.gpu_count,
                    app.models,
                    int(inst_count[a]),
                    int(miners_on[a]),
                    float(all_capacity[a]),
                    ct,
                    float(sums["compute_units"][a]) / ct
                    if ct > 0
                    else app.gpu_count * min(market.multiplier[m] for m in app.models),
                    float(sums["invocations"][a]),
                    float(sums["rate_limited"][a]),
                    float(work_per_request[a]),
                    float(last_invoked[a]),
                    bounty=bool(asked[a] > 0 and inst_count[a] == 0),
                )
            )
        span_h = min(now + tick, sc.window_s) / 3600
        totals = {
            Reward.COMPUTE_UNITS: float(sums["compute_units"].sum()) / span_h,
            Reward.INVOCATIONS: float(sums["invocations"].sum()) / span_h,
            Reward.UNIQUE_APPS: float(miners_on.sum()),
        }
        for m in miners:
            mine = [i for i in live if i.miner == m.index]
            view = AppMarketView(
                now=now,
                window_s=sc.window_s,
                apps=infos,
                deployments=[
                    Deployment(
                        i.id,
                        apps[i.app].id,
                        i.placement.node_id,
                        i.model,
                        i.gpus,
                        i.placement.gpu_uuids,
                        i.started_at,
                        i.ready_at,
                        i.last_invoked_at,
                        i.served,
                    )
                    for i in mine
                ],
                cluster=m.state,
                hourly_cost=market.hourly_cost,
                speed=market.speed,
                multiplier=market.multiplier,
                weights=weights,
                concurrency=sc.concurrency,
                totals=totals,
                covered_s=span_h * 3600,
            )
            try:
                actions = m.strategy.plan(view)
            except Exception:  # a strategy that raises does nothing this tick
                m.errors += 1
                actions = []
            for action in actions:
                serial = _apply(action, m, market, instances, now, serial, counted)
                if m.index == 0 and len(decisions) < DECISIONS_KEPT:
                    decisions.append(
                        {
                            "at_h": round(now / 3600, 3),
                            "step": str(action.step),
                            "app": action.app_id,
                            "models": sorted(action.models),
                            "deployment": action.deployment_id,
                            "reason": action.reason[:300],
                        }
                    )
        # -- time series (this miner) -----------------------------------------------------
        if now + tick > next_sample:
            ours = miners[0]
            score = _score(miners, weights)[0]
            series["t_h"].append(round(now / 3600, 4))
            series["score"].append(round(score, 5))
            series["utilisation"].append(round(ours.state.allocated_milli / (ours.gpus * MILLI), 4))
            hours = sc.sample_s / 3600
            series["cu_per_hour"].append(round((ours.compute_units - last_cu) / hours, 2))
            last_cu = ours.compute_units
            next_sample += sc.sample_s
    return AppRun(strategy.name, market.seed, _app_metrics(miners, market), series, decisions)


def _apply(
    action: AppAction,
    miner: Miner,
    market: AppMarket,
    instances: dict[str, Instance],
    now: float,
    serial: int,
    counted: bool,
) -> int:
    index = {a.id: k for k, a in enumerate(market.apps)}
    if action.step in (Step.SCALE_DOWN, Step.PREEMPT):
        inst = instances.get(action.deployment_id)
        if inst is None or inst.miner != miner.index:
            return serial
        miner.state.unreserve(inst.placement)
        del instances[inst.id]
        serving = inst.last_invoked_at > now - RECENT_S
        if counted:
            if action.step == Step.PREEMPT or serving:
                miner.preemptions += 1
            else:
                miner.scale_downs += 1
        return serial
    a = index.get(action.app_id)
    if a is None:
        return serial
    app = market.apps[a]
    models = action.models & app.models or app.models
    request = TaskRequest(
        f"{app.id}-{serial}",
        GpuRequest(
            count=app.gpu_count, models=frozenset(models), model_text="|".join(sorted(models))
        ),
    )
    placed = miner.framework.decide(miner.state, request)
    if not isinstance(placed, Placement):
        miner.refused += 1
        return serial
    serial += 1
    node = miner.state.nodes[miner.state.index[placed.node_id]]
    model = next(g.model for g in node.gpus if g.uuid == placed.gpu_uuids[0])
    inst = Instance(
        request.task_id, miner.index, a, model, app.gpu_count, placed, now, now + app.cold_start_s
    )
    instances[inst.id] = inst
    if counted:
        miner.cold_starts += 1
    return serial


def _score(miners: Sequence[Miner], weights: dict[Reward, float]) -> list[float]:
    parts = {
        Reward.COMPUTE_UNITS: [m.compute_units for m in miners],
        Reward.INVOCATIONS: [m.invocations for m in miners],
        Reward.UNIQUE_APPS: [m.unique_s for m in miners],
    }
    scores = [0.0] * len(miners)
    for reward, values in parts.items():
        total = sum(values)
        if total > 0:
            for k, v in enumerate(values):
                scores[k] += weights.get(reward, 0.0) * v / total
    return scores


def _app_metrics(miners: Sequence[Miner], market: AppMarket) -> dict[str, float]:
    sc = market.scenario
    ours = miners[0]
    counted_h = max(sc.hours - sc.warmup_hours, 1e-9)
    fleet_cost = (
        sum(market.hourly_cost[g.model] * g.nodes * g.gpus_per_node for g in sc.fleet) * counted_h
    )
    share = _score(miners, dict(sc.weights))[0]
    gpu_hours = ours.gpus * counted_h
    totals = [
        sum(getattr(m, f) for m in miners) for f in ("compute_units", "invocations", "unique_s")
    ]
    return {
        "score_share": share,
        "score_share_per_dollar": share / fleet_cost,
        "compute_units_per_gpu_hour": ours.compute_units / gpu_hours,
        "compute_unit_share": ours.compute_units / totals[0] if totals[0] else 0.0,
        "invocation_share": ours.invocations / totals[1] if totals[1] else 0.0,
        "unique_app_share": ours.unique_s / totals[2] if totals[2] else 0.0,
        "unique_apps": ours.unique_s / (counted_h * 3600),
        "utilisation": ours.held_gpu_s / (ours.gpus * counted_h * 3600),
        "cold_starts": float(ours.cold_starts),
        "preemptions": float(ours.preemptions),
        "scale_downs": float(ours.scale_downs),
        "refused_placements": float(ours.refused),
        "strategy_errors": float(ours.errors),
        "fleet_cost_usd": fleet_cost,
    }
