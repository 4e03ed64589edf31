"""The `earnings` strategy: price each order for what the GPUs it takes could
otherwise earn, and for app markets run what earns the most reward per GPU-hour.

Lease markets (`EarningsStrategy`). For each model the order fits on now:

    expected profit per hour at price r x list = P_win(r) * (r * list - cost)
    cost = busy cost + opportunity cost + fragmentation cost   (per hour, for its GPUs)

- *list*: the built-in pricing's quote for the order on that model (`[pricing]`).
- *P_win(r)*: learned from this provider's own bids: per model, the share of bids won
  at each price ratio, counts decaying with a half-life (the market's mood changes),
  held non-increasing in price (pool adjacent violators) and pulled towards a plain
  prior (even odds at the list price) while there are few bids. Each bid is moved a
  little off the best ratio (by a hash of the order id: deterministic) so that the
  neighbouring prices keep being tried.
- *busy cost*: what a working GPU costs the operator per hour (power, cooling, wear).
- *opportunity cost*: what the GPUs would earn otherwise. A GPU of a model is worth
  what the best price earns on it (the same P_win curve against its list price), times
  how likely the GPU is to be wanted while this lease holds it, which rises steeply as
  the model's GPUs fill: (utilisation after placing, above `idle_below`, scaled)^2.
- *fragmentation cost*: the growth, by this placement, of its node's fragmentation as
  FGD (Weng et al., ATC'23; `scheduler/fragmentation.py`) measures it against the
  task shapes this provider has been offered lately, valued like idle GPUs. A
  placement that fills a fragment lowers it: a discount.

It bids the price and model of the highest expected profit; declines when none is
positive, naming the terms. Never above `max_ratio` x list, never above the cap.

App markets (`EarningsApps`): every tick, while GPUs are free, for each app and GPU
model, the score one more instance of this miner would add per hour: its share of the
app's demand (served and rate-limited, from the validator's figures) given the
instances already there, as compute units and invocations over the market's totals,
plus one unique app for its first instance, each by the validator's public weights;
less the cold start (nothing until ready, over a two-hour horizon); per GPU. The best
goes first, best fit on that model. An instance is stopped only when it has served
nothing for 10 minutes and its GPUs are worth well more elsewhere: it never preempts
work that serves.

What it does not use, and a live provider would not have: other providers' prices,
fleets or load, how long a lease will really run (only its declared duration), orders
not yet arrived, or a simulation's settings; its costs are the operator's own.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import numpy as np

from gpuprovider.domain.resources import MILLI
from gpuprovider.market.model import MAX_MONEY, MICROS, Action, Cause, Decision
from gpuprovider.market.strategy import (
    BID_VALID_S,
    AppAction,
    AppMarketView,
    Choice,
    Option,
    Outcome,
    Reward,
    Situation,
    Step,
    decline,
)
from gpuprovider.scheduler.fragmentation import BoundTypicalTasks, TaskShape, TypicalTasks
from gpuprovider.scheduler.framework import Policy
from gpuprovider.scheduler.plugins import POLICIES
from gpuprovider.scheduler.state import ClusterState

RATIOS = np.round(np.arange(0.5, 3.0001, 0.01), 2)  # price / list price, the bid grid


@dataclass
class EarningsSettings:
    half_life_s: float = 3 * 3600.0  # how fast old bids stop counting
    prior_weight: float = 4.0  # bids' worth of the prior at each price
    prior_width: float = 0.1  # the prior's odds fall from 1 to 0 over list +- ~2 widths
    explore: float = 0.01  # bids move up to this share off the best price
    max_ratio: float = 3.0
    idle_below: float = 0.5  # utilisation under which a GPU is not missed
    typical_orders: int = 2000  # recent orders whose shapes make the typical tasks
    rebind_every: int = 250
    load_steps: tuple[float, ...] = (0.7, 0.9)  # utilisation classes the odds are kept for
    frag_weight: float = 1.0  # a fragmented GPU counted as this many idle ones
    scarcity_power: float = 2.0  # how steeply a GPU is missed as its model fills
    pending_max: int = 100_000  # bids awaiting an outcome kept at most (the oldest go)


class WinCurve:
    """P(win | price ratio) for one model, from decayed counts of bids and wins."""

    def __init__(self, settings: EarningsSettings):
        self.settings = settings
        self.bids = np.zeros(len(RATIOS))
        self.wins = np.zeros(len(RATIOS))
        self.at = 0.0
        self.total = 0.0
        prior = 1 / (1 + np.exp((RATIOS - 1.0) / settings.prior_width))
        self.prior = prior
        self._curve: np.ndarray | None = None

    def decay_to(self, now: float) -> None:
        # counts decay together: the curve moves little within a minute
        if now > self.at + 60:
            keep = 0.5 ** ((now - self.at) / self.settings.half_life_s)
            self.bids *= keep
            self.wins *= keep
            self.total *= keep
            self.at = now
            self._curve = None

    def record(self, ratio: float, won: bool, now: float) -> None:
        self.decay_to(now)
        k = int(np.clip(np.searchsorted(RATIOS, ratio - 0.005), 0, len(RATIOS) - 1))
        self.bids[k] += 1
        self.wins[k] += won
        self.total += 1
        self._curve = None

    def curve(self, now: float) -> np.ndarray:
        self.decay_to(now)
        if self._curve is None:
            w = self.settings.prior_weight
            raw = (self.wins + w * self.prior) / (self.bids + w)
            self._curve = _non_increasing(raw)
        return self._curve


def _non_increasing(values: np.ndarray) -> np.ndarray:
    """A non-increasing sequence through `values`: the mean of their running minimum from
    the cheapest price and running maximum from the dearest (both non-increasing, one
    below and one above the values)."""
    below = np.minimum.accumulate(values)
    above = np.maximum.accumulate(values[::-1])[::-1]
    return (below + above) / 2


class EarningsStrategy:
    """See the module's docstring. `busy_cost` is the operator's cost of a working GPU
    per hour, per model (USD; absent: nothing)."""

    name = "earnings"

    def __init__(self, busy_cost: Mapping[str, float], settings: EarningsSettings | None = None):
        self.busy_cost = dict(busy_cost)
        self.settings = settings or EarningsSettings()
        self.curves: dict[tuple[str, str, int], WinCurve] = {}  # (model, size, load)
        self.pending: dict[str, tuple[tuple[str, str, int], float]] = {}  # order -> (curve, ratio)
        # recent orders' shapes, each weighted by what it offered (GPU-hours at list price)
        self.shapes: deque[tuple[TaskShape, float]] = deque(maxlen=self.settings.typical_orders)
        self.weights: dict[TaskShape, float] = {}
        self.seen = 0
        self.bound: dict[str, BoundTypicalTasks] = {}
        self.masks: dict[str, np.ndarray] = {}  # the cluster's GPUs of each model
        self._shapes: dict[tuple[Hashable, ...], TaskShape] = {}  # shapes are few: made once each
        self._frags: dict[tuple[Hashable, ...], float] = {}  # fragmentation growth by node state
        self.bound_to: ClusterState | None = None

    # -- learning ---------------------------------------------------------------------

    def curve(self, key: tuple[str, str, int]) -> WinCurve:
        found = self.curves.get(key)
        if found is None:
            found = self.curves[key] = WinCurve(self.settings)
        return found

    def observe(self, outcome: Outcome) -> None:
        bid = self.pending.pop(outcome.order_id, None)
        if bid is not None:
            key, ratio = bid
            self.curve(key).record(ratio, outcome.won, outcome.at)

    def _remember(self, situation: Situation) -> None:
        options = [o for o in situation.options if o.model]
        if not options:
            return
        request = options[0].request
        gpu = request.gpu
        models = frozenset(o.model for o in options)
        key = (request.cpu_milli, gpu.milli_per_gpu if gpu.wants_gpu else 0, gpu.gpus_touched)
        shape = self._shapes.get((key, models))
        if shape is None:
            shape = self._shapes[(key, models)] = TaskShape(*key, models)
        quotes = [o.quote.price_per_hour for o in options if o.quote is not None]
        hours = min(situation.order.duration_s, 86400) / 3600
        worth = (min(quotes) / MICROS if quotes else gpu.gpus_touched) * hours
        if len(self.shapes) == self.shapes.maxlen:
            old, old_worth = self.shapes[0]
            left = self.weights[old] - old_worth
            if left <= 1e-12:
                del self.weights[old]
            else:
                self.weights[old] = left
        self.shapes.append((shape, worth))
        self.weights[shape] = self.weights.get(shape, 0.0) + worth
        self.seen += 1

    def _typical(self, cluster: ClusterState) -> dict[str, BoundTypicalTasks]:
        """Per GPU model, the typical tasks of the orders that model could serve, by
        what they offered: a node's fragmentation then counts only the demand that
        could use it (FGD also counts, as fragmented, capacity that shapes of other
        models could never use; that part is the same wherever the order goes)."""
        if self.bound_to is not cluster or self.seen % self.settings.rebind_every == 0:
            self.masks = {
                m: (cluster.gpu_model == code) & cluster.gpu_usable
                for code, m in enumerate(cluster.models)
            }
            self.bound = {}
            self._frags.clear()
            for model in cluster.models:
                mine = {s: w for s, w in self.weights.items() if s.models and model in s.models}
                if mine:
                    self.bound[model] = TypicalTasks(mine).bind(cluster)
            self.bound_to = cluster
        return self.bound

    # -- deciding ---------------------------------------------------------------------

    def decide(self, situation: Situation) -> Choice:
        self._remember(situation)
        order, now, cluster = situation.order, situation.now, situation.cluster
        typical = self._typical(cluster)
        best: tuple[float, Option, float, str, tuple[str, str, int]] | None = None
        reasons: list[str] = []
        for option in situation.options:
            if option.placement is None or option.quote is None or not option.model:
                reasons.append(f"{option.model or 'no GPU'}: {option.why or option.unpriceable}")
                continue
            gpus = order.resources.gpus
            list_h = option.quote.price_per_hour / MICROS
            per_gpu_list = list_h / gpus if gpus else list_h
            taking = option.placement.gpu_milli * len(option.placement.gpu_uuids)
            used = _utilisation(cluster, self.masks.get(option.model), taking)
            # our own load stands in for the market's: rivals fill up when we do
            key = (option.model, _size(gpus), _load(used, self.settings.load_steps))
            curve = self.curve(key).curve(now)
            busy = self.busy_cost.get(option.model, 0.0)
            gpu_value = self._gpu_value(curve, per_gpu_list, busy)
            above = max(0.0, (used - self.settings.idle_below) / (1 - self.settings.idle_below))
            scarce = above**self.settings.scarcity_power
            opportunity = gpu_value * scarce * gpus
            frag = 0.0
            if option.model in typical:
                growth = self._frag(typical[option.model], cluster, option) / MILLI
                frag = growth * gpu_value * self.settings.frag_weight
            cost = busy * gpus + opportunity + frag
            top = min(
                self.settings.max_ratio, order.max_price_per_hour / option.quote.price_per_hour
            )
            usable = top + 1e-9 >= RATIOS
            if not usable.any():
                reasons.append(f"{option.model}: the cap is under half our list price")
                continue
            profit = curve[usable] * (RATIOS[usable] * list_h - cost)
            k = int(profit.argmax())
            ratio = float(RATIOS[usable][k])
            if profit[k] <= 0:
                reasons.append(
                    f"{option.model}: no price pays (cap {top:.2f}x list; costs {cost:.3f}/h: "
                    f"busy {busy * gpus:.3f}, opportunity {opportunity:.3f} at {used:.0%} "
                    f"used, fragmentation {frag:.3f})"
                )
                continue
            why = (
                f"{ratio:.2f}x list on {option.model}: win {curve[usable][k]:.0%}, costs "
                f"{cost:.3f}/h (busy {busy * gpus:.3f}, opportunity {opportunity:.3f} at "
                f"{used:.0%} used, fragmentation {frag:+.3f})"
            )
            if best is None or profit[k] > best[0]:
                best = (float(profit[k]), option, ratio, why, key)
        if best is None:
            priced = any(o.placement is not None and o.quote is not None for o in situation.options)
            cause = Cause.PRICE if priced else Cause.CAPACITY  # it fits: no price pays
            return decline("; ".join(reasons) or "nothing fits now", self.name, cause)
        _, option, ratio, why, key = best
        assert option.quote is not None
        ratio *= 1 + self.settings.explore * _jitter(order.id)
        price = round(option.quote.price_per_hour * ratio)
        price = max(1, min(price, order.max_price_per_hour, MAX_MONEY))
        ratio = price / option.quote.price_per_hour
        if len(self.pending) >= self.settings.pending_max:  # a market that never answers
            self.pending.pop(next(iter(self.pending)))
        self.pending[order.id] = (key, ratio)
        return Choice(Decision(Action.BID, why, price, now + BID_VALID_S), option.model, self.name)

    def _frag(self, typical: BoundTypicalTasks, cluster: ClusterState, option: Option) -> float:
        """`_frag_growth`, remembered by the node's state and the placement: nodes pass
        through the same few states (until the typical tasks change)."""
        p = option.placement
        assert p is not None
        i = cluster.index[p.node_id]
        key = (
            option.model,
            cluster.gpu_free[i].tobytes(),
            int(cluster.cpu_free[i]),
            int(cluster.mem_free[i]),
            tuple(cluster.slots(i, p.gpu_uuids)),
            p.gpu_milli,
            p.cpu_milli,
            p.memory_mib,
        )
        found = self._frags.get(key)
        if found is None:
            if len(self._frags) > 100_000:
                self._frags.clear()
            found = self._frags[key] = _frag_growth(typical, cluster, option)
        return found

    @staticmethod
    def _gpu_value(curve: np.ndarray, per_gpu_list: float, busy: float) -> float:
        """What a GPU of this model earns per hour at the best price against the curve."""
        return max(0.0, float((curve * (RATIOS * per_gpu_list - busy)).max()))


def _size(gpus: float) -> str:
    """Orders of a size meet rivals alike: many can host a share, few 8 whole GPUs."""
    if gpus < 1:
        return "share"
    return "1" if gpus == 1 else ("2-4" if gpus <= 4 else "5+")


def _load(used: float, steps: tuple[float, ...]) -> int:
    return int(np.searchsorted(steps, used, side="right"))


def _jitter(order_id: str) -> float:
    """A fixed number in [-1, 1) for an order: the same order, the same move."""
    digest = hashlib.blake2b(order_id.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") / 2**31 - 1


def _utilisation(cluster: ClusterState, mask: np.ndarray | None, adding_milli: int) -> float:
    """The share of a model's GPU capacity (`mask`: its GPUs) in use once `adding_milli`
    more is."""
    if mask is None:
        return 1.0
    capacity = int(mask.sum()) * MILLI
    if not capacity:
        return 1.0
    used = capacity - int(cluster.gpu_free[mask].sum()) + adding_milli
    return min(1.0, used / capacity)


def _frag_growth(typical: BoundTypicalTasks, cluster: ClusterState, option: Option) -> float:
    """How much the option's placement grows its node's fragmentation (milli-GPU)."""
    placement = option.placement
    assert placement is not None
    i = cluster.index[placement.node_id]
    free = np.repeat(cluster.gpu_free[i : i + 1], 2, axis=0)  # before, after
    free[1, cluster.slots(i, placement.gpu_uuids)] -= placement.gpu_milli
    cpu = np.array([cluster.cpu_free[i], cluster.cpu_free[i] - placement.cpu_milli])
    memory = np.array([cluster.mem_free[i], cluster.mem_free[i] - placement.memory_mib])
    model = np.repeat(cluster.node_model[i : i + 1], 2)
    before, after = typical.node_frag(free, cpu, memory, model)
    return float(after - before)


# -- app markets ----------------------------------------------------------------------


@dataclass
class AppSettings:
    cold_start_s: float = 360.0  # what a start costs in time before it serves
    horizon_s: float = 7200.0  # how long an instance is expected to keep its place
    replace_margin: float = 1.5  # a replacement must be worth this much more per GPU
    idle_s: float = 600.0  # an instance idle this long may be replaced (never one serving)
    max_starts: int = 64  # scale-ups per tick at most


class EarningsApps:
    """See the module's docstring (app markets)."""

    name = "earnings"

    def __init__(self, settings: AppSettings | None = None):
        self.settings = settings or AppSettings()
        self.policy: Policy = POLICIES["best-fit"]

    def plan(self, view: AppMarketView) -> list[AppAction]:
        s = self.settings
        apps = list(view.apps)
        state = view.cluster
        free = ((state.gpu_free == MILLI) & state.gpu_usable).sum(axis=1)
        free[~state.usable] = 0
        idle = [
            d
            for d in view.deployments
            if d.ready_at <= view.now - s.idle_s and d.last_invoked_at <= view.now - s.idle_s
        ]
        if not apps or (not free.any() and not idle):
            return []  # full, and everything serves: nothing to decide
        figures_s = max(view.figures_s, 1.0)
        k = view.concurrency
        w = view.weights
        position = {a.app_id: i for i, a in enumerate(apps)}
        demand = np.array([(a.invocations + a.rate_limited) * a.work_per_request_s for a in apps])
        demand /= figures_s
        # The market's totals per hour, at least what its demand would give once served
        # (early on little is served yet), and every app run by someone.
        calls_h = sum(a.invocations + a.rate_limited for a in apps) / figures_s * 3600
        units_h = 3600 * sum(
            demand[i]
            * a.gpu_count
            * float(
                np.mean([view.multiplier.get(m, 0.0) / view.speed.get(m, 1.0) for m in a.models])
            )
            for i, a in enumerate(apps)
        )
        per_cu = w.get(Reward.COMPUTE_UNITS, 0.0) / max(
            view.totals.get(Reward.COMPUTE_UNITS, 0.0), units_h, 1e-9
        )
        per_call = w.get(Reward.INVOCATIONS, 0.0) / max(
            view.totals.get(Reward.INVOCATIONS, 0.0), calls_h, 1e-9
        )
        per_app = w.get(Reward.UNIQUE_APPS, 0.0) / max(
            view.totals.get(Reward.UNIQUE_APPS, 0.0), float(len(apps))
        )
        capacity = np.array([a.capacity for a in apps])
        per_request = np.array([max(a.work_per_request_s, 1e-9) for a in apps])
        gpus = np.array([a.gpu_count for a in apps], dtype=np.float64)
        ours = np.zeros(len(apps))
        count = np.zeros(len(apps))
        for d in view.deployments:
            if d.app_id in position:
                ours[position[d.app_id]] += k * view.speed.get(d.model, 1.0)
                count[position[d.app_id]] += 1
        models = list(state.models)
        pair_app = np.array(
            [i for i, a in enumerate(apps) for m in models if m in a.models], dtype=np.int64
        )
        pair_model = np.array(
            [j for a in apps for j, m in enumerate(models) if m in a.models], dtype=np.int64
        )
        if not len(pair_app):
            return []
        speed = np.array([view.speed.get(m, 1.0) for m in models])
        units_per_work = np.array([view.multiplier.get(m, 0.0) for m in models]) / speed

        def gains(pairs: np.ndarray, sign: float = 1.0) -> np.ndarray:
            """Score per hour one instance adds (sign 1) or takes (-1), per pair."""
            a, m = pair_app[pairs], pair_model[pairs]
            c = k * speed[m]
            others = np.maximum(capacity[a] - ours[a], 0.0)
            before = ours[a] if sign > 0 else np.maximum(ours[a] - c, 0.0)
            after = before + c
            served_before = np.minimum(demand[a], others + before)
            served_after = np.minimum(demand[a], others + after)
            mine_before = np.divide(
                before * served_before, others + before, out=np.zeros(len(a)), where=before > 0
            )
            mine_after = after * served_after / (others + after)
            work = (mine_after - mine_before) * 3600
            first = (count[a] == 0) if sign > 0 else (count[a] == 1)
            earned: np.ndarray = (
                per_cu * work * units_per_work[m] * gpus[a]
                + per_call * work / per_request[a]
                + per_app * first
            )
            return earned

        fresh = 1 - s.cold_start_s / s.horizon_s
        everything = np.arange(len(pair_app))
        value = gains(everything) * fresh / gpus[pair_app]
        node_model = state.node_model

        def widest(j: int) -> int:
            rows = node_model == j
            return int(free[rows].max()) if rows.any() else 0

        room = np.array([widest(j) for j in range(len(models))])
        actions: list[AppAction] = []
        stoppable = sorted(
            (
                (
                    float(
                        gains(
                            self._pair(
                                pair_app, pair_model, position[d.app_id], models.index(d.model)
                            ),
                            -1,
                        )[0]
                    )
                    / d.gpus,
                    d,
                )
                for d in idle
                if d.app_id in position and d.model in models
            ),
            key=lambda p: p[0],
        )
        for _ in range(s.max_starts):
            fits = room[pair_model] >= gpus[pair_app]
            candidates = np.where(fits & (value > 0), value, -np.inf)
            best = int(candidates.argmax())
            if candidates[best] == -np.inf:
                if not stoppable:
                    break
                loss, victim = stoppable[0]
                wanted = np.where(value > 0, value, -np.inf)
                wanted[pair_model != models.index(victim.model)] = -np.inf
                wanted[gpus[pair_app] > victim.gpus + room[models.index(victim.model)]] = -np.inf
                best = int(wanted.argmax())
                if wanted[best] == -np.inf or wanted[best] <= s.replace_margin * max(loss, 0.0):
                    break
                stoppable.pop(0)
                actions.append(
                    AppAction(
                        Step.SCALE_DOWN,
                        victim.app_id,
                        f"idle {s.idle_s:.0f} s; its GPUs earn {wanted[best]:.3g} on "
                        f"{apps[pair_app[best]].app_id} against {loss:.3g} per GPU-hour",
                        deployment_id=victim.id,
                    )
                )
                j = position[victim.app_id]
                ours[j] -= k * view.speed.get(victim.model, 1.0)
                count[j] -= 1
                free[state.index[victim.node_id]] += victim.gpus
                room[models.index(victim.model)] = widest(models.index(victim.model))
                value[pair_app == j] = gains(np.flatnonzero(pair_app == j)) * fresh / gpus[j]
                if room[pair_model[best]] < gpus[pair_app[best]]:
                    continue
            i, j = int(pair_app[best]), int(pair_model[best])
            rows = np.flatnonzero((node_model == j) & (free >= gpus[i]))
            row = int(rows[np.argmin(free[rows])])  # best fit, as the scheduler will
            free[row] -= int(gpus[i])
            room[j] = widest(j)
            actions.append(
                AppAction(
                    Step.SCALE_UP,
                    apps[i].app_id,
                    f"adds {value[best]:.3g} score per GPU-hour on {models[j]}",
                    models=frozenset({models[j]}),
                )
            )
            ours[i] += k * speed[j]
            count[i] += 1
            mine = np.flatnonzero(pair_app == i)
            value[mine] = gains(mine) * fresh / gpus[i]
        return actions

    @staticmethod
    def _pair(pair_app: np.ndarray, pair_model: np.ndarray, app: int, model: int) -> np.ndarray:
        return np.flatnonzero((pair_app == app) & (pair_model == model))[:1]
