"""What providers run by default today, rule for rule, as strategies:

- `akash-default`: Akash's stock pricing script (`price_script_generic.sh` in the
  akash-provider Helm chart) on the order as Akash hands it to the script
  (`pricing.akash_input`), bidding on every order that fits, first come first served,
  each bid valid 5 minutes;
- `swan-default`: Swan's Computing Provider: accept an order when its offered price
  covers the price table's cost for its resources and duration (also the built-in
  pricing `service/market.py` falls back on);
- `gepetto-default`: the Chutes miner's `gepetto.py` autoscaler, preemption and server
  choice, on the figures a validator publishes.

Each rule has a test on a hand-made tiny market (`tests/test_market_sim.py`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import numpy as np

from gpuprovider.domain import catalogue
from gpuprovider.domain.pricing import PriceTable
from gpuprovider.market.model import MICROS, Action, Cause, Decision, Order, charge
from gpuprovider.market.pricing import GIB, Quote, Unpriceable, akash_input, gpu_rate
from gpuprovider.market.strategy import (
    AppAction,
    AppInfo,
    AppMarketView,
    Choice,
    Deployment,
    Option,
    Outcome,
    Situation,
    Step,
    decline,
    offer,
)
from gpuprovider.scheduler.framework import Context, Policy, Scores
from gpuprovider.scheduler.plugins import DEFAULT_FILTERS, pick_lowest
from gpuprovider.scheduler.state import row_count

# -- Akash --------------------------------------------------------------------------

# The stock script's targets (USD per month) and its month: 30.437 days.
AKASH_CPU_THREAD_MONTH = Decimal("1.60")
AKASH_MEMORY_GB_MONTH = Decimal("0.80")
AKASH_EPHEMERAL_GB_MONTH = Decimal("0.02")
AKASH_ENDPOINT_MONTH = Decimal("0.05")
AKASH_IP_MONTH = Decimal("5")
AKASH_GPU_MONTH = Decimal("100")  # when no per-model price is mapped
AKASH_MONTH_H = Decimal("30.437") * 24
AKASH_BID_VALID_S = 300.0  # the provider's bid timeout: 5 minutes


def akash_key(model_id: str) -> str:
    """The key a GPU model has in the script's PRICE_TARGET_GPU_MAPPINGS: Akash's model
    name and its memory (`h100.80Gi`); the script also tries the bare name (`h100`)."""
    known = catalogue.models().get(model_id)
    name = re.sub(r"[^a-z0-9]", "", known.family if known else model_id)
    return f"{name}.{known.memory_gb}gi" if known else name


def akash_mappings(table: PriceTable) -> dict[str, Decimal]:
    """The mappings an operator writes for its price table: each catalogue model the
    table prices, at its price per GPU-hour times the script's month."""
    mapped: dict[str, Decimal] = {}
    for model_id in catalogue.models():
        try:
            rate = gpu_rate(table, model_id)
        except Unpriceable:
            continue
        mapped[akash_key(model_id)] = Decimal(str(rate)) * AKASH_MONTH_H
    return mapped


class AkashStockPricing:
    """The stock script's formula as a `PricingPolicy`: CPU per thread-month, memory and
    ephemeral storage per GB-month, endpoints and IPs per month, GPUs per unit-month at
    the mapped price of their model (`model.vram`, then `model`), else the highest
    mapped price, else $100. `gpu.units` is whole GPUs, so a share pays a whole GPU."""

    def __init__(self, mappings: Mapping[str, Decimal] | None = None, block_s: float = 6.0):
        self.mappings = {k.lower(): Decimal(v) for k, v in (mappings or {}).items()}
        self.block_s = block_s
        self.gpu_max = max([AKASH_GPU_MONTH, *self.mappings.values()])

    def gpu_month(self, model: str, ram: str) -> Decimal:
        key = f"{model}.{ram}" if ram else model
        for candidate in (key, key.rsplit(".", 1)[0], key.split(".", 1)[0]):
            if candidate in self.mappings:
                return self.mappings[candidate]
        return self.gpu_max  # unknown model: the highest mapped price

    def month_usd(self, akash: dict[str, Any]) -> Decimal:
        total = Decimal(0)
        for r in akash["resources"]:
            count = r["count"]
            total += Decimal(r["cpu"]) * count / 1000 * AKASH_CPU_THREAD_MONTH
            total += Decimal(r["memory"]) * count / GIB * AKASH_MEMORY_GB_MONTH
            ephemeral = sum(s["size"] for s in r["storage"] if s["class"] == "ephemeral")
            total += Decimal(ephemeral) * count / GIB * AKASH_EPHEMERAL_GB_MONTH
            total += Decimal(r.get("endpoint_quantity") or 0) * count * AKASH_ENDPOINT_MONTH
            total += Decimal(r.get("ip_lease_quantity") or 0) * count * AKASH_IP_MONTH
            if gpu := r.get("gpu"):
                nvidia = gpu["attributes"]["vendor"]["nvidia"]
                price = self.gpu_month(nvidia["model"], nvidia.get("ram", ""))
                total += Decimal(count) * gpu["units"] * price
        return total

    def quote(self, order: Order, model: str) -> Quote:
        month = self.month_usd(akash_input(order, model, self.block_s))
        per_hour = math.ceil(month / AKASH_MONTH_H * MICROS)
        if per_hour <= 0:
            raise Unpriceable("the stock pricing script prices this order at 0")
        billed = order.duration_s
        return Quote(model, per_hour, charge(per_hour, billed), billed, [("akash", per_hour)])


class AkashDefault:
    """Bid the stock script's price on every order that fits now (the provider's
    inventory has room: first come, first served), on the model the scheduler would
    use (the cheapest by the script when several fit); bids last 5 minutes."""

    name = "akash-default"

    def __init__(self, pricing: AkashStockPricing):
        self.pricing = pricing

    def decide(self, situation: Situation) -> Choice:
        priced: list[tuple[int, Option, Quote]] = []
        for option in situation.options:
            if option.fits_now:
                q = self.pricing.quote(situation.order, option.model)
                priced.append((q.price_per_hour, option, q))
        if not priced:
            why = "; ".join(f"{o.model}: {o.why}" for o in situation.options) or "no GPU fits"
            return decline(f"does not fit now ({why})", self.name)
        price, option, q = min(priced, key=lambda p: (p[0], p[1].model))
        if price > situation.order.max_price_per_hour:
            return decline(f"script price {price} is above the cap", self.name, Cause.PRICE)
        reason = f"stock pricing script: {price / MICROS:.4f}/h on {option.model}"
        expires = situation.now + AKASH_BID_VALID_S
        return Choice(Decision(Action.BID, reason, price, expires), option.model, self.name)

    def observe(self, outcome: Outcome) -> None:
        return None


# -- Swan (and the built-in pricing) -----------------------------------------------


class TablePricing:
    """Swan's rule, which is also the daemon's built-in one: take the cheapest quote of
    the price table among the models the order fits on (now, or once the operator's
    preemptible work gives way); accept when the order's offered price covers the
    table's charge for its resources and duration, at the table's price."""

    def __init__(self, name: str = "swan-default"):
        self.name = name

    def decide(self, situation: Situation) -> Choice:
        order = situation.order
        quoted = [o for o in situation.options if o.usable and o.quote is not None]
        if not quoted:
            why = "; ".join(
                f"{o.model or 'no GPU'}: {o.unpriceable or o.why}" for o in situation.options
            )
            unpriced = any(o.usable and o.quote is None for o in situation.options)
            cause = Cause.UNPRICEABLE if unpriced else Cause.CAPACITY
            return decline(why or "cannot run it", self.name, cause)
        option = min(quoted, key=lambda o: (o.quote.price_per_hour, o.model))  # type: ignore[union-attr]
        q = option.quote
        assert q is not None
        offered = charge(order.max_price_per_hour, q.billed_s)
        if q.total > offered:
            return decline(
                f"the offer pays {offered} for {q.billed_s} s; the table asks {q.total} "
                f"({q.explain()})",
                self.name,
                Cause.PRICE,
            )
        return offer(situation, option, q.price_per_hour, q.explain(), self.name)

    def observe(self, outcome: Outcome) -> None:
        return None


# -- Chutes: gepetto ------------------------------------------------------------------

GEPETTO_MAX_LOCAL = 3  # instances of one app on one miner
GEPETTO_RATE_LIMIT_DIVISOR_FROM = 5  # instances from which rate limits count a fifth
GEPETTO_SCALE_DOWN_MIN_AGE_S = 300.0
GEPETTO_PREEMPT_VERIFIED_S = 3600.0
GEPETTO_RECENT_INVOCATION_S = 600.0


def gepetto_policy(hourly_cost: Mapping[str, float]) -> Policy:
    """gepetto's `optimal_scale_up_server` as a scheduler policy: among the servers with
    enough free GPUs of a supported model, the cheapest per GPU-hour, then the one with
    the fewest free GPUs (bin packing); GPUs the lowest-indexed free ones."""
    cost = dict(hourly_cost)

    def score(ctx: Context, candidates: np.ndarray) -> Scores:
        state = ctx.state
        models = [state.models[m] if m >= 0 else "" for m in state.node_model[candidates]]
        per_gpu = np.array([cost.get(m, math.inf) for m in models])
        free = row_count(ctx.fitting(candidates))
        return Scores(-per_gpu * 1e6 - free)

    return Policy(
        "gepetto",
        score,
        pick_lowest,
        DEFAULT_FILTERS,
        description="cheapest server per GPU-hour, then the fewest free GPUs",
    )


def gepetto_gain(app: AppInfo) -> float:
    """gepetto's potential gain of one more instance: compute units (compute time x
    multiplier) plus rate-limited requests credited at compute units per invocation
    (a fifth of them from 5 instances on), shared over the instances plus the new one."""
    rate_limited = app.rate_limited
    if app.instances >= GEPETTO_RATE_LIMIT_DIVISOR_FROM:
        rate_limited /= 5
    compute_units = app.compute_time_s * app.compute_multiplier
    per_invocation = compute_units / (app.invocations or 1.0)
    theoretical = compute_units
    if per_invocation and rate_limited:
        theoretical += rate_limited * per_invocation
    return theoretical / (app.instances + 1) if app.instances else theoretical


class Servers:
    """The miner's nodes as gepetto's server queries see them (one plan's worth)."""

    def __init__(self, view: AppMarketView):
        state = view.cluster
        self.state = state
        self.free = ((state.gpu_free == 1000) & state.gpu_usable).sum(axis=1)
        self.free[~state.usable] = 0
        self.model = state.node_model
        costs = np.array([view.hourly_cost.get(m, math.inf) for m in state.models] + [math.inf])
        self.cost = costs[self.model]  # node model -1 (no GPU) reads inf
        self.found: dict[tuple[frozenset[str], int], tuple[str, str] | None] = {}
        self.masks: dict[frozenset[str], np.ndarray] = {}

    def best(self, models: frozenset[str], count: int) -> tuple[str, str] | None:
        """(node id, model) of `optimal_scale_up_server`: the cheapest per GPU-hour among
        the nodes with `count` free whole GPUs of one of `models`, then the fewest free."""
        key = (models, count)
        if key not in self.found:
            state = self.state
            mask = self.masks.get(models)
            if mask is None:
                accepted = np.array([m in models for m in state.models] + [False])
                mask = self.masks[models] = accepted[self.model]
            rows = np.flatnonzero(mask & (self.free >= count))
            if not len(rows):
                self.found[key] = None
            else:
                row = int(rows[np.lexsort((rows, self.free[rows], self.cost[rows]))[0]])
                self.found[key] = (state.nodes[row].id, state.models[self.model[row]])
        return self.found[key]

    def take(self, node_id: str, count: int) -> None:
        """Count GPUs a planned scale-up will take, for the queries after it."""
        self.free[self.state.index[node_id]] -= count
        self.found.clear()


def gepetto_server(
    view: AppMarketView, app: AppInfo, servers: Servers | None = None
) -> tuple[str, str] | None:
    """(node id, model) of `optimal_scale_up_server` for `app`, or None."""
    return (servers or Servers(view)).best(app.models, app.gpu_count)


def gepetto_scale_down(view: AppMarketView, app_id: str) -> Deployment | None:
    """`optimal_scale_down_deployment`: of the app's deployments older than 5 minutes,
    the one whose server has the highest hourly cost x used/total GPUs."""
    state = view.cluster
    best: tuple[float, Deployment] | None = None
    for d in view.deployments:
        if d.app_id != app_id or d.started_at > view.now - GEPETTO_SCALE_DOWN_MIN_AGE_S:
            continue
        i = state.index[d.node_id]
        usable = state.gpu_usable[i]
        used = int((state.gpu_free[i][usable] < 1000).sum())
        total = int(usable.sum()) or 1
        server_cost = view.hourly_cost.get(d.model, 0.0) * total
        score = server_cost * used / total
        if best is None or score > best[0]:
            best = (score, d)
    return None if best is None else best[1]


class Victims:
    """gepetto's `optimal_preemptable_deployment`, over one plan: the deployments that
    may be preempted, lowest value first. Never a job, never one verified less than 60
    minutes ago, never the last local instance of an app invoked in the last 10
    minutes; value: the app's compute units over its instances."""

    def __init__(self, view: AppMarketView):
        apps = {a.app_id: a for a in view.apps}
        local: dict[str, int] = {}
        for d in view.deployments:
            local[d.app_id] = local.get(d.app_id, 0) + 1
        ranked: list[tuple[tuple[float, float], Deployment]] = []
        for d in view.deployments:
            info = apps.get(d.app_id)
            if d.job or d.ready_at > view.now - GEPETTO_PREEMPT_VERIFIED_S:
                continue
            recent = (
                info is not None and info.last_invoked_at > view.now - GEPETTO_RECENT_INVOCATION_S
            )
            if recent and local[d.app_id] <= 1:
                continue
            value = 0.0
            if info is not None and info.instances:
                value = info.compute_time_s * info.compute_multiplier / info.instances
            ranked.append(((value, d.started_at), d))
        ranked.sort(key=lambda r: r[0])
        self.ranked = [d for _, d in ranked]
        self.taken: set[str] = set()

    def pick(self, app: AppInfo) -> Deployment | None:
        """The lowest-value deployment of another app on GPUs `app` runs on, with at
        least its GPU count; taken out of the candidates."""
        for d in self.ranked:
            if d.id in self.taken or d.app_id == app.app_id:
                continue
            if d.model in app.models and d.gpus >= app.gpu_count:
                self.taken.add(d.id)
                return d
        return None


def gepetto_victim(view: AppMarketView, app: AppInfo) -> Deployment | None:
    return Victims(view).pick(app)


class GepettoDefault:
    """gepetto.py, every 15 s: claim each bounty (an app invoked with no instance
    anywhere) by scaling it to one instance, preempting if no server has room; then scale
    up by one instance the single app of highest value = potential gain / (server hourly
    cost x GPUs per instance), skipping apps with 3 local instances, apps without
    metrics, and apps whose instances are all ours and not rate limited."""

    name = "gepetto-default"

    def __init__(self, hourly_cost: Mapping[str, float]):
        self.policy = gepetto_policy(hourly_cost)

    def plan(self, view: AppMarketView) -> list[AppAction]:
        actions: list[AppAction] = []
        local: dict[str, int] = {}
        for d in view.deployments:
            local[d.app_id] = local.get(d.app_id, 0) + 1
        servers = Servers(view)
        victims: Victims | None = None
        for app in view.apps:
            if not app.bounty or local.get(app.app_id):
                continue
            server = gepetto_server(view, app, servers)
            if server is None:
                victims = victims or Victims(view)
                victim = victims.pick(app)
                if victim is None:
                    continue
                actions.append(
                    AppAction(
                        Step.PREEMPT,
                        app.app_id,
                        f"bounty on {app.app_id}: no server free; {victim.app_id} has the "
                        "lowest value",
                        deployment_id=victim.id,
                    )
                )
            else:
                servers.take(server[0], app.gpu_count)
            actions.append(
                AppAction(Step.SCALE_UP, app.app_id, "claim the bounty", models=app.models)
            )
            local[app.app_id] = 1
        values: list[tuple[float, str, str]] = []
        for app in view.apps:
            count = local.get(app.app_id, 0)
            if count >= GEPETTO_MAX_LOCAL:
                continue
            if app.invocations <= 0 and app.rate_limited <= 0:
                continue  # no metrics: scaling would be unproductive
            if count and count >= app.instances and not app.rate_limited:
                continue  # every instance is ours already
            server = gepetto_server(view, app, servers)
            if server is None:
                continue
            gain = gepetto_gain(app)
            value = gain / (view.hourly_cost[server[1]] * app.gpu_count)
            values.append((value, app.app_id, server[1]))
        if values:
            value, app_id, model = max(values, key=lambda v: (v[0], v[1]))
            app = next(a for a in view.apps if a.app_id == app_id)
            actions.append(
                AppAction(
                    Step.SCALE_UP,
                    app_id,
                    f"highest value {value:.4g} (gain per {model} GPU-hour)",
                    models=app.models,
                )
            )
        return actions
