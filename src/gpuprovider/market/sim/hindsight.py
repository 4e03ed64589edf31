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
    start: np.ndarray,
    end: np.ndarray,
    gpus: np.ndarray,
    values: np.ndarray,
    cap: np.ndarray,
    horizon_s: float,
    step_s: float = 60.0,
) -> tuple[float, float]:
    """(value of the set, of which leases of 4 GPUs or more)."""
    slots = max(1, math.ceil(horizon_s / step_s))
    used = np.zeros((len(cap), slots))
    best = values.max(axis=1)
    density = best / (gpus * (end - start))
    first = (start // step_s).astype(np.int64)
    last = np.minimum(slots, np.maximum(np.ceil(end / step_s).astype(np.int64), first + 1))
    preference = np.argsort(-values, axis=1, kind="stable").tolist()
    total = big = 0.0
    for i in np.argsort(-density, kind="stable").tolist():
        if best[i] <= 0:
            break
        a, b, g = int(first[i]), int(last[i]), float(gpus[i])
        for j in preference[i]:
            value = float(values[i, j])
            if value <= 0:
                break
            span = used[j, a:b]
            if span.max() + g <= cap[j] + 1e-9:
                span += g
                total += value
                big += value if g >= 4 else 0.0
                break
    return total, big


class _Slots:
    """GPU-seconds a subset of the intervals holds in each slot of a uniform grid: the
    first and last slot of each interval are partial, the ones between whole."""

    def __init__(
        self, start: np.ndarray, end: np.ndarray, gpus: np.ndarray, slot_s: float, slots: int
    ):
        self.slots, self.slot_s, self.gpus = slots, slot_s, gpus
        self.first = np.minimum((start // slot_s).astype(np.int64), slots - 1)
        self.last = np.minimum((end // slot_s).astype(np.int64), slots - 1)
        same = self.first == self.last
        # seconds held in the first and the last slot (all of it in one when they are one)
        self.head = np.where(same, end - start, (self.first + 1) * slot_s - start)
        self.tail = np.where(same, 0.0, end - self.last * slot_s)
        self.inner = ~same  # whole slots strictly between first and last, if any

    def held(self, chosen: np.ndarray) -> np.ndarray:
        g = self.gpus * chosen
        n = self.slots + 1
        total = np.bincount(self.first, weights=g * self.head, minlength=n)
        total += np.bincount(self.last, weights=g * self.tail, minlength=n)
        whole = g * self.inner * self.slot_s
        steps = np.bincount(self.first + 1, weights=whole, minlength=n + 1)[:n]
        steps -= np.bincount(self.last, weights=whole, minlength=n)
        return (total + np.cumsum(steps))[: self.slots]


def _dual(
    start: np.ndarray,
    end: np.ndarray,
    gpus: np.ndarray,
    values: np.ndarray,
    cap: np.ndarray,
    horizon_s: float,
    slot_s: float,
    iterations: int,
    lower: float,
) -> float:
    slots = max(1, math.ceil(horizon_s / slot_s))
    prices = np.zeros((len(cap), slots))  # lambda: USD per GPU-second
    best_bound = math.inf
    step = 1.0
    stalled = 0
    rows = np.arange(len(start))
    held = _Slots(start, end, gpus, slot_s, slots)
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
            gradient[j] = cap[j] * slot_s - held.held(taken & (choice == j))
        norm = float((gradient**2).sum())
        if norm <= 0 or step < 1e-4 or best_bound - lower <= 1e-6 * max(1.0, abs(lower)):
            break
        prices = np.maximum(0.0, prices - step * (bound - lower) / norm * gradient)
    return best_bound
