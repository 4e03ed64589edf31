"""Policies as plugins for the framework's extension points."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable

import numpy as np

from gpuprovider.domain.resources import MILLI
from gpuprovider.scheduler.fragmentation import TYPICAL_COVERAGE
from gpuprovider.scheduler.framework import (
    Context,
    Filter,
    GpuPicker,
    Policy,
    Scores,
    signs_nothing,
)
from gpuprovider.scheduler.state import ClusterState, CompiledTask, row_count

# -- filters ------------------------------------------------------------------


def _selector_ok(
    state: ClusterState, task: CompiledTask, rows: np.ndarray | slice, fitting: np.ndarray
) -> np.ndarray:
    selector = task.request.node_selector
    if not selector:
        return np.ones(len(fitting), dtype=bool)
    nodes = [state.nodes[i] for i in np.arange(len(state))[rows]]
    return np.array([all(n.labels.get(k) == v for k, v in selector) for n in nodes], dtype=bool)


def _selector_reason(state: ClusterState, task: CompiledTask, failed: np.ndarray) -> Counter[str]:
    def missing(labels: dict[str, str]) -> str:
        return next(f"{k}={v}" for k, v in task.request.node_selector if labels.get(k) != v)

    return Counter(f"label {missing(state.nodes[i].labels)} not set" for i in failed)


def _usable_reason(state: ClusterState, task: CompiledTask, failed: np.ndarray) -> Counter[str]:
    return Counter(state.nodes[i].unusable_reason for i in failed)


def _cpu_reason(state: ClusterState, task: CompiledTask, failed: np.ndarray) -> dict[str, int]:
    most = state.cpu_free[failed].max() / 1000
    return {f"not enough free CPU (at most {most:g} of {task.cpu / 1000:g} cores)": len(failed)}


def _memory_reason(state: ClusterState, task: CompiledTask, failed: np.ndarray) -> dict[str, int]:
    most = state.mem_free[failed].max()
    return {f"not enough free memory (at most {most} of {task.memory} MiB)": len(failed)}


def _gpus_ok(
    state: ClusterState, task: CompiledTask, rows: np.ndarray | slice, fitting: np.ndarray
) -> np.ndarray:
    if not task.wants_gpu:
        return np.ones(len(fitting), dtype=bool)
    return row_count(fitting) >= task.count


node_usable = Filter(
    "usable", lambda s, t, rows, f: s.usable[rows], _usable_reason, signs_nothing, static=True
)
node_selector = Filter(
    "selector",
    _selector_ok,
    _selector_reason,
    lambda t: t.request.node_selector,
    static=True,
)
cpu_fits = Filter(
    "cpu", lambda s, t, rows, f: s.cpu_free[rows] >= t.cpu, _cpu_reason, lambda t: t.cpu
)
memory_fits = Filter(
    "memory",
    lambda s, t, rows, f: s.mem_free[rows] >= t.memory,
    _memory_reason,
    lambda t: t.memory,
)
gpus_fit = Filter(
    "gpus",
    _gpus_ok,
    lambda s, t, failed: {"not enough free GPUs of the kind asked": len(failed)},
    signs_nothing,  # reads only `fitting`, which the framework signs
)


def _pool_ok(
    state: ClusterState, task: CompiledTask, rows: np.ndarray | slice, fitting: np.ndarray
) -> np.ndarray:
    pool = task.request.pool
    if pool is None:
        return np.ones(len(fitting), dtype=bool)
    return state.pool_free(rows, pool[0], pool[1])


def _pool_reason(state: ClusterState, task: CompiledTask, failed: np.ndarray) -> dict[str, int]:
    assert task.request.pool is not None
    name, limit = task.request.pool
    pool = name.split("/", 1)[-1]
    return {f"pool {pool} is at its limit ({limit} per node)": len(failed)}


def _pinned_ok(
    state: ClusterState, task: CompiledTask, rows: np.ndarray | slice, fitting: np.ndarray
) -> np.ndarray:
    pin = task.request.node_id
    if pin is None:
        return np.ones(len(fitting), dtype=bool)
    return np.array([state.nodes[i].id == pin for i in np.arange(len(state))[rows]], dtype=bool)


pinned = Filter(
    "pinned",
    _pinned_ok,
    lambda s, t, failed: {"its pipeline's work store is on another node": len(failed)},
    lambda t: t.request.node_id or "",
    static=True,
)

# A pipeline stage's pool: at most its per-node limit of the pool's stages on a node.
pool_limit = Filter("pool", _pool_ok, _pool_reason, lambda t: t.request.pool or ())

DEFAULT_FILTERS = (
    node_usable,
    node_selector,
    pinned,
    cpu_fits,
    memory_fits,
    gpus_fit,
    pool_limit,
)

# -- GPU pickers ----------------------------------------------------------------


def _share_goes_to(choose: Callable[[np.ndarray], np.intp]) -> GpuPicker:
    """A picker that gives a share the GPU `choose` selects by room left (lowest index
    on ties) and whole GPUs the lowest-indexed free ones."""

    def pick(ctx: Context, node: int) -> list[int]:
        if not ctx.task.count:
            return []
        fits = np.nonzero(ctx.fitting(node))[0]
        if ctx.task.milli < MILLI:
            return [int(fits[choose(ctx.state.gpu_free[node, fits])])]
        return [int(j) for j in fits[: ctx.task.count]]

    return pick


# The GPU with the least room that fits: shares pack, so whole GPUs stay whole.
pick_tightest = _share_goes_to(np.argmin)
pick_roomiest = _share_goes_to(np.argmax)


def pick_lowest(ctx: Context, node: int) -> list[int]:
    return [int(j) for j in np.nonzero(ctx.fitting(node))[0][: ctx.task.count]]


# -- scorers --------------------------------------------------------------------

# Normalisation constants of the FGD paper's best-fit score (milli-CPU, milli-GPU).
MAX_SPEC_CPU = 128_000
MAX_SPEC_GPU = 8_000


def _leftover(ctx: Context, candidates: np.ndarray) -> np.ndarray:
    """0.5 * CPU left + 0.5 * GPU left after placing, each scaled to [0, 1]."""
    state, task = ctx.state, ctx.task
    cpu_left = (state.cpu_free[candidates] - task.cpu) / MAX_SPEC_CPU
    gpu_left = (state.gpu_free_total[candidates] - task.milli * task.count) / MAX_SPEC_GPU
    score: np.ndarray = 0.5 * cpu_left + 0.5 * gpu_left
    return score


def score_first(ctx: Context, candidates: np.ndarray) -> Scores:
    return Scores(np.zeros(len(candidates)))


def score_best_fit(ctx: Context, candidates: np.ndarray) -> Scores:
    """The FGD paper's BestFit: least CPU and GPU left over, on kube's integer scale.
    (kube then rescales scores min-max to 0..100, which changes no node's rank and
    no tie at the top, so that step is left out.)"""
    return Scores(np.floor((1.0 - _leftover(ctx, candidates)) * 100))


def score_spread(ctx: Context, candidates: np.ndarray) -> Scores:
    return Scores(_leftover(ctx, candidates))


@functools.cache
def _earlier(g: int) -> np.ndarray:
    """bool[1, G, G]: whether slot k comes before slot j, at [0, j, k]."""
    return np.tril(np.ones((g, g), dtype=bool), k=-1)[None, :, :]


def _share_candidates(ctx: Context, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(candidate row, GPU slot) pairs a share may go to. GPUs of a node with equal
    room lead to the same state, so only the lowest-indexed of each is tried."""
    free = ctx.state.gpu_free[candidates]
    fits = ctx.fitting(candidates)
    same = (free[:, :, None] == free[:, None, :]) & fits[:, None, :]
    duplicate = (same & _earlier(free.shape[1])).any(axis=2)
    rows, gpus = np.nonzero(fits & ~duplicate)
    return rows, gpus


def _group_starts(keys: np.ndarray) -> np.ndarray:
    """Where each run of equal keys begins in `keys` (grouped)."""
    starts = np.empty(len(keys), dtype=bool)
    starts[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=starts[1:])
    return np.flatnonzero(starts)


def _best_per_node(
    ctx: Context,
    candidates: np.ndarray,
    rows: np.ndarray,
    gpus: np.ndarray | None,
    values: np.ndarray,
) -> Scores:
    """Reduce per-(node, GPU) scores to one per node, keeping its best GPU (lowest index
    among equals). Pairs come grouped by node, every candidate node with at least one."""
    if gpus is None:
        return Scores(values)
    starts = _group_starts(rows)
    best = np.maximum.reduceat(values, starts)
    sizes = np.diff(starts, append=len(rows))
    at_best = np.flatnonzero(values == np.repeat(best, sizes))
    first = at_best[_group_starts(rows[at_best])]
    return Scores(best.astype(np.float64), gpus[first])


def _frag_growth(
    ctx: Context, candidates: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """How much each candidate placement would grow its node's fragmentation.

    Returns (candidate row, GPU slot or None, growth). The after-state is the node's
    cached statistics updated by what the placement changes: one GPU for a share,
    whole free GPUs otherwise, and CPU.
    """
    tracker = ctx.fragmentation()
    tracker.refresh()
    typical, state, task = tracker.typical, ctx.state, ctx.task
    u = typical.thresholds[None, :]
    if task.wants_gpu and task.milli < MILLI:
        rows, gpus = _share_candidates(ctx, candidates)
        nodes = candidates[rows]
        before = state.gpu_free[nodes, gpus][:, None]
        after = before - task.milli
        fits = tracker.fits_count[nodes] - (before >= u) + (after >= u)
        short = (
            tracker.short_sum[nodes]
            - np.where(before < u, before, 0)
            + np.where(after < u, after, 0)
        )
    else:
        rows, gpus, nodes = np.arange(len(candidates)), None, candidates
        # whole GPUs go from all room to none: each leaves every share size's count
        fits = tracker.fits_count[nodes] - task.count * (u <= MILLI)
        short = tracker.short_sum[nodes]
    total = tracker.total[nodes] - task.milli * task.count
    frag_after = typical.frag_from(
        fits,
        short,
        total,
        state.cpu_free[nodes] - task.cpu,
        state.mem_free[nodes] - task.memory,
        state.node_model[nodes],
    )
    return rows, gpus, frag_after - tracker.frag[nodes]


def score_fgd(ctx: Context, candidates: np.ndarray) -> Scores:
    """Fragmentation Gradient Descent, as the paper's simulator scores it: the
    sigmoid of the fragmentation removed (in GPUs), on kube's integer 0..100 scale."""
    rows, gpus, growth = _frag_growth(ctx, candidates)
    values = np.floor(100.0 / (1.0 + np.exp(growth / MILLI))).astype(np.int64)
    return _best_per_node(ctx, candidates, rows, gpus, values)


def score_fgd_warm(ctx: Context, candidates: np.ndarray) -> Scores:
    """FGD's score first; among equal scores, a node already in use before an idle one.

    FGD's integer score makes many nodes equal, whole-GPU tasks above all (they seldom
    change typical-task fragmentation). Keeping such work off idle nodes keeps those
    whole for the multi-GPU tasks too rare to be typical. Ties left go to node order,
    as in FGD; unlike best fit, this does not favour small nodes of a scarce model.
    """
    rows, gpus, growth = _frag_growth(ctx, candidates)
    fgd = np.floor(100.0 / (1.0 + np.exp(growth / MILLI)))
    state = ctx.state
    nodes = candidates[rows]
    idle = (state.gpu_free[nodes] == np.where(state.gpu_usable[nodes], MILLI, 0)).all(axis=1)
    idle &= state.cpu_free[nodes] == state.cpu_total[nodes]
    return _best_per_node(ctx, candidates, rows, gpus, fgd * 2 - idle)


POLICIES: dict[str, Policy] = {
    "best-fit": Policy(
        "best-fit",
        score_best_fit,
        pick_tightest,
        DEFAULT_FILTERS,
        description="least CPU and GPU left on the node (the FGD paper's BestFit)",
    ),
    "first-fit": Policy(
        "first-fit",
        score_first,
        pick_lowest,
        DEFAULT_FILTERS,
        description="the first node that fits, in node order",
    ),
    "spread": Policy(
        "spread",
        score_spread,
        pick_roomiest,
        DEFAULT_FILTERS,
        description="the node with the most left (worst fit)",
    ),
    "random": Policy(
        "random",
        score_first,
        pick_lowest,
        DEFAULT_FILTERS,
        random_ties=True,
        description="any node that fits, uniformly",
    ),
    "fgd": Policy(
        "fgd",
        score_fgd,
        pick_tightest,
        DEFAULT_FILTERS,
        typical_coverage=TYPICAL_COVERAGE,
        description="fragmentation gradient descent (Weng et al., USENIX ATC'23)",
    ),
    "fgd-warm": Policy(
        "fgd-warm",
        score_fgd_warm,
        pick_tightest,
        DEFAULT_FILTERS,
        typical_coverage=TYPICAL_COVERAGE,
        description="FGD, with equal scores going to a node already in use",
    ),
    "fgd-full": Policy(
        "fgd-full",
        score_fgd_warm,
        pick_tightest,
        DEFAULT_FILTERS,
        typical_coverage=1.0,
        typical_memory=True,
        description="fgd-warm planning for every task shape seen (not only the most "
        "common ones covering 95 %), memory included",
    ),
}


def policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown scheduler policy {name!r}; choose one of {', '.join(POLICIES)}"
        ) from None
