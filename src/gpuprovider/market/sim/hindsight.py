"""The hindsight bound of a lease market: the most one provider could have earned had it
known every order, its real duration and the lowest rival bid in advance.

The problem: choose leases (each on one of the models it accepts) so that at no moment
a model's leases hold more GPUs than the fleet has, maximising their net value. It is
bounded from both sides, on its relaxation that ignores node boundaries:

- `upper`: the Lagrangian dual of the LP relaxation, with one price per GPU model per
  `slot_s` of time: for any prices lambda >= 0,
      sum_m C_m * integral(lambda_m) + sum_i max(0, max_m v_im - g_i * integral_i(lambda_m))
  is at least what any feasible set earns (weak duality); projected subgradient steps
  (Polyak's step towards the lower bound) make it small. No set of leases earns more.
- `lower`: a greedy set (highest value per GPU-second first, on the first model with
  room over its whole interval, at one-minute granularity) that fits every model's GPU
  count at every moment: the bound is at least this.

Regret is measured against `upper`, so it is never understated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BoundOrder:
    start: float
    end: float
    gpus: float
    values: Mapping[str, float]  # net value (USD) of running it on each model


@dataclass(frozen=True)
class Bound:
    upper: float
    lower: float
    lower_big: float = 0.0  # of `lower`, what leases of 4 GPUs or more earn


def lease_bound(
    orders: Sequence[BoundOrder],
    capacity: Mapping[str, float],
    horizon_s: float,
    slot_s: float = 300.0,
    iterations: int = 200,
) -> Bound:
    models = sorted(capacity)
    kept = [
        o
        for o in orders
        if o.end > o.start
        and o.gpus > 0
        and any(v > 0 for m, v in o.values.items() if m in capacity)
    ]
    if not kept:
        return Bound(0.0, 0.0)
    start = np.array([o.start for o in kept])
    end = np.array([o.end for o in kept])
    gpus = np.array([o.gpus for o in kept])
    values = np.full((len(kept), len(models)), -np.inf)
    for i, o in enumerate(kept):
        for j, m in enumerate(models):
            if m in o.values:
                values[i, j] = o.values[m]
    cap = np.array([float(capacity[m]) for m in models])
    lower, big = _greedy(start, end, gpus, values, cap, horizon_s)
    upper = _dual(start, end, gpus, values, cap, horizon_s, slot_s, iterations, lower)
    return Bound(max(upper, lower), lower, big)


def _greedy(
    start, end, gpus, values, cap, horizon_s: float, step_s: float = 60.0
) -> tuple[float, float]:
    """(value of the set, of which leases of 4 GPUs or more)."""
    slots = max(1, math.ceil(horizon_s / step_s))
    used = np.zeros((len(cap), slots))
    best = values.max(axis=1)
    density = best / (gpus * (end - start))
    total = big = 0.0
    for i in np.argsort(-density, kind="stable"):
        if best[i] <= 0:
            break
        a, b = (
            int(start[i] // step_s),
            min(slots, max(math.ceil(end[i] / step_s), int(start[i] // step_s) + 1)),
        )
        for j in np.argsort(-values[i], kind="stable"):
            if values[i, j] <= 0:
                break
            if used[j, a:b].max() + gpus[i] <= cap[j] + 1e-9:
                used[j, a:b] += gpus[i]
                total += float(values[i, j])
                big += float(values[i, j]) if gpus[i] >= 4 else 0.0
                break
    return total, big


class _Ramps:
    """sum_i g_i * (clip(t, s_i, e_i) - s_i) at the grid times, for any subset of the
    intervals: the sorts are done once, a subset is a weight of 0."""

    def __init__(self, grid: np.ndarray, start: np.ndarray, end: np.ndarray, gpus: np.ndarray):
        self.grid = grid
        self.gpus = gpus
        self.by_start = np.argsort(start, kind="stable")
        self.by_end = np.argsort(end, kind="stable")
        self.start_sorted = start[self.by_start]
        self.end_sorted = end[self.by_end]
        self.at_start = np.searchsorted(self.start_sorted, grid, side="right")
        self.at_end = np.searchsorted(self.end_sorted, grid, side="right")

    def held(self, chosen: np.ndarray) -> np.ndarray:
        """GPU-seconds the chosen intervals hold in each slot of the grid."""
        g = self.gpus * chosen
        total = np.zeros(len(self.grid))
        for order, times, at, sign in (
            (self.by_start, self.start_sorted, self.at_start, 1.0),
            (self.by_end, self.end_sorted, self.at_end, -1.0),
        ):
            weights = g[order]
            cum_g = np.concatenate([[0.0], np.cumsum(weights)])
            cum_gt = np.concatenate([[0.0], np.cumsum(weights * times)])
            total += sign * (self.grid * cum_g[at] - cum_gt[at])
        return np.diff(total)


def _dual(start, end, gpus, values, cap, horizon_s, slot_s, iterations, lower) -> float:
    slots = max(1, math.ceil(horizon_s / slot_s))
    grid = np.arange(slots + 1) * slot_s
    prices = np.zeros((len(cap), slots))  # lambda: USD per GPU-second
    best_bound = math.inf
    step = 1.0
    stalled = 0
    rows = np.arange(len(start))
    ramps = _Ramps(grid, start, end, gpus)
    # where each interval's ends fall on the grid: slot and the share of it passed
    s_slot = np.minimum((start // slot_s).astype(np.int64), slots - 1)
    e_slot = np.minimum((end // slot_s).astype(np.int64), slots - 1)
    s_frac = (start - s_slot * slot_s) / slot_s
    e_frac = (end - e_slot * slot_s) / slot_s
    for _ in range(iterations):
        cumulative = np.concatenate(
            [np.zeros((len(cap), 1)), np.cumsum(prices * slot_s, axis=1)], axis=1
        )
        # integral of lambda from 0 to t, for t at every interval's start and end
        at_end = cumulative[:, e_slot] + prices[:, e_slot] * slot_s * e_frac
        at_start = cumulative[:, s_slot] + prices[:, s_slot] * slot_s * s_frac
        charged = (at_end - at_start).T
        reduced = values - gpus[:, None] * charged
        choice = reduced.argmax(axis=1)
        gain = reduced[rows, choice]
        taken = gain > 0
        bound = float((cap * cumulative[:, -1]).sum() + gain[taken].sum())
        if bound < best_bound - 1e-9:
            best_bound, stalled = bound, 0
        else:
            stalled += 1
            if stalled >= 15:
                step, stalled = step / 2, 0
        gradient = np.empty_like(prices)
        for j in range(len(cap)):
            gradient[j] = cap[j] * slot_s - ramps.held(taken & (choice == j))
        norm = float((gradient**2).sum())
        if norm <= 0 or step < 1e-4 or best_bound - lower <= 1e-6 * max(1.0, abs(lower)):
            break
        prices = np.maximum(0.0, prices - step * (bound - lower) / norm * gradient)
    return best_bound
