"""GPU fragmentation as defined by FGD (Weng et al., USENIX ATC'23).

A node's idle GPU capacity is *fragmented* for a task it cannot serve. Given the
tasks a cluster typically sees, with their frequencies, a node's fragmentation
is the expected amount of its idle GPU capacity that the next typical task could
not use:

- the task needs no GPU, or cannot use this node's model, or does not fit
  (not enough GPUs with room for its per-GPU share, or not enough CPU): all the
  node's idle GPU capacity is fragmented for it;
- the task fits: only the GPUs with less room than its per-GPU share are.

FGD places each task where it grows the cluster's fragmentation the least.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from gpuprovider.scheduler.model import TaskRequest
from gpuprovider.scheduler.state import ClusterState

# The paper's simulator keeps the most common task shapes that together cover
# this share of all tasks, and renormalises their frequencies.
TYPICAL_COVERAGE = 0.95


@dataclass(frozen=True)
class TaskShape:
    cpu: int
    milli: int  # per GPU
    count: int
    models: frozenset[str] | None
    memory: int = 0  # MiB; 0 where fragmentation is read without memory (the paper's)

    @classmethod
    def of(cls, task: TaskRequest, memory: bool = False) -> TaskShape:
        gpu = task.gpu
        mem = task.memory_mib if memory else 0
        if not gpu.wants_gpu:
            return cls(task.cpu_milli, 0, 0, None, mem)
        return cls(task.cpu_milli, gpu.milli_per_gpu, gpu.gpus_touched, gpu.models, mem)


class TypicalTasks:
    """The shapes tasks usually have, with how often each occurs."""

    def __init__(self, shapes: dict[TaskShape, float]):
        total = sum(shapes.values())
        if total <= 0:
            raise ValueError("typical tasks need at least one shape with a positive weight")
        self.shapes = list(shapes)
        self.weight = np.array([shapes[s] for s in self.shapes], dtype=np.float64)
        self.total_weight = float(total)
        self.freq = self.weight / total

    @classmethod
    def from_tasks(
        cls, tasks: Iterable[TaskRequest], coverage: float = TYPICAL_COVERAGE, memory: bool = False
    ) -> TypicalTasks:
        counts = Counter(TaskShape.of(t, memory) for t in tasks)
        total = sum(counts.values())
        # Most common first; equal counts ordered by shape so the cut is deterministic.
        ranked = sorted(
            counts.items(),
            key=lambda kv: (
                -kv[1],
                kv[0].cpu,
                kv[0].milli,
                kv[0].count,
                str(kv[0].models),
                kv[0].memory,
            ),
        )
        kept: dict[TaskShape, float] = {}
        covered = 0
        for shape, count in ranked:
            if covered >= coverage * total:
                break
            kept[shape] = count
            covered += count
        return cls(kept)

    def bind(self, state: ClusterState) -> BoundTypicalTasks:
        return BoundTypicalTasks(self, state)


class BoundTypicalTasks:
    """Typical tasks as arrays against one cluster's model codes."""

    def __init__(self, typical: TypicalTasks, state: ClusterState):
        shapes = typical.shapes
        self.freq = typical.freq
        self.weight, self.total_weight = typical.weight, typical.total_weight
        self.cpu = np.array([s.cpu for s in shapes], dtype=np.int64)
        self.memory = np.array([s.memory for s in shapes], dtype=np.int64)
        self.count = np.array([s.count for s in shapes], dtype=np.int64)
        self.is_gpu = np.array([s.milli > 0 for s in shapes], dtype=bool)
        self.thresholds = np.array(sorted({s.milli for s in shapes if s.milli > 0}), dtype=np.int64)
        where = {int(u): k for k, u in enumerate(self.thresholds)}
        self.threshold_of = np.array([where.get(s.milli, 0) for s in shapes], dtype=np.int64)
        # access[m, t]: whether a node of model code m can serve shape t, which wants a
        # GPU (last row: a node without GPUs)
        access = np.zeros((len(state.models) + 1, len(shapes)), dtype=bool)
        for t, shape in enumerate(shapes):
            access[:-1, t] = state.model_mask(shape.models) & self.is_gpu[t]
        self.access = access

    def stats(self, gpu_free: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per node state: GPUs with room for each share size, the room on the GPUs
        without, and all the room; what fragmentation is computed from."""
        u = self.thresholds[None, None, :]
        free = gpu_free[:, :, None]
        fits_count = (free >= u).sum(axis=1)  # [K, U]
        short_sum = np.where(free < u, free, 0).sum(axis=1)  # [K, U]
        return fits_count, short_sum, gpu_free.sum(axis=1)

    def frag_from(
        self,
        fits_count: np.ndarray,
        short_sum: np.ndarray,
        total: np.ndarray,
        cpu_free: np.ndarray,
        mem_free: np.ndarray,
        model: np.ndarray,
    ) -> np.ndarray:
        """Expected fragmented milli-GPU of each node state.

        Summed with the raw weights (task counts: integers, so the sum is exact in any
        order) and divided once: equal node states get equal values whichever batch
        they are computed in, and a placement that changes nothing grows it by exactly
        zero, where FGD's integer score would otherwise flip on a rounding error."""
        if not len(self.thresholds):
            return total * float(self.freq.sum())
        fits = (
            (fits_count[:, self.threshold_of] >= self.count[None, :])
            & (cpu_free[:, None] >= self.cpu[None, :])
            & (mem_free[:, None] >= self.memory[None, :])
            & self.access[model]  # model -1 (no GPU) reads the last row: no access
        )
        frag = np.where(fits, short_sum[:, self.threshold_of], total[:, None])
        return (frag @ self.weight) / self.total_weight

    def node_frag(
        self, gpu_free: np.ndarray, cpu_free: np.ndarray, mem_free: np.ndarray, model: np.ndarray
    ) -> np.ndarray:
        return self.frag_from(*self.stats(gpu_free), cpu_free, mem_free, model)


class FragTracker:
    """Each node's fragmentation in a cluster state (and what it is computed from),
    recomputed only for the nodes that changed."""

    def __init__(self, typical: BoundTypicalTasks, state: ClusterState):
        self.typical = typical
        self.state = state
        n, u = len(state), len(typical.thresholds)
        self.seen = -1  # position in the state's change log
        self.frag = np.zeros(n, dtype=np.float64)
        self.fits_count = np.zeros((n, u), dtype=np.int64)
        self.short_sum = np.zeros((n, u), dtype=np.int64)
        self.total = np.zeros(n, dtype=np.int64)

    def refresh(self) -> None:
        state = self.state
        stale = state.changed_since(self.seen)
        self.seen = len(state.changes)
        if len(stale):
            fits, short, total = self.typical.stats(state.gpu_free[stale])
            self.fits_count[stale], self.short_sum[stale], self.total[stale] = fits, short, total
            self.frag[stale] = self.typical.frag_from(
                fits,
                short,
                total,
                state.cpu_free[stale],
                state.mem_free[stale],
                state.node_model[stale],
            )

    def current(self) -> np.ndarray:
        self.refresh()
        return self.frag

    def total_frag(self) -> float:
        return float(self.current().sum())
