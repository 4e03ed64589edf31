"""The cluster as arrays: one row per node, one column per GPU slot.

Filters and scorers work on whole columns at once, which is what lets one
library place tasks for a daemon with a few nodes and replay a 1,213-node
production trace in seconds.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

from gpuprovider.domain.resources import MILLI, GpuRequest
from gpuprovider.scheduler.model import NodeView, Placement, RunningTask, Snapshot, TaskRequest

ALL = slice(None)  # every node, as a row index
# Up to this many changes, a cache reads the change log; beyond, one pass over the nodes.
READ_LOG_UP_TO = 32


@dataclass
class CompiledTask:
    """A task request with its GPU constraints resolved against one cluster."""

    request: TaskRequest
    cpu: int
    memory: int
    count: int  # GPUs touched: whole GPUs, or 1 for a share
    milli: int  # per GPU: 1000 for whole GPUs, the share for a fraction, 0 for none
    eligible: np.ndarray  # bool[N, G]: usable GPUs of an accepted model and memory

    @property
    def wants_gpu(self) -> bool:
        return self.count > 0


class ClusterState:
    """Free resources per node and per GPU, updated in place by `reserve`."""

    def __init__(self, nodes: list[NodeView]):
        n = len(nodes)
        # GPU columns padded to a multiple of 8 so rows can be counted 8 at a time
        g = max(8, -(-max((len(node.gpus) for node in nodes), default=0) // 8) * 8)
        self.nodes = nodes
        self.index = {node.id: i for i, node in enumerate(nodes)}
        self.models: list[str] = sorted({gpu.model for node in nodes for gpu in node.gpus})
        code = {m: i for i, m in enumerate(self.models)}
        self.cpu_free = np.array([nd.cpu_milli - nd.used_cpu_milli for nd in nodes], dtype=np.int64)
        self.mem_free = np.array(
            [nd.memory_mib - nd.used_memory_mib for nd in nodes], dtype=np.int64
        )
        self.cpu_total = np.array([nd.cpu_milli for nd in nodes], dtype=np.int64)
        self.usable = np.array([not nd.unusable_reason for nd in nodes], dtype=bool)
        # per node: pool -> work of that pool there (pipeline stages with per-node limits)
        self.pool_used: list[dict[str, int]] = [dict(nd.pools) for nd in nodes]
        self.gpu_free = np.zeros((n, g), dtype=np.int64)
        self.gpu_usable = np.zeros((n, g), dtype=bool)
        self.gpu_model = np.full((n, g), -1, dtype=np.int64)
        self.gpu_memory_gb = np.zeros((n, g), dtype=np.int64)
        # The model a node offers, for fragmentation (nodes hold one model in practice).
        self.node_model = np.full(n, -1, dtype=np.int64)
        for i, node in enumerate(nodes):
            for j, gpu in enumerate(node.gpus):
                self.gpu_model[i, j] = code[gpu.model]
                self.gpu_memory_gb[i, j] = gpu.memory_gb
                if not gpu.unusable_reason:
                    self.gpu_usable[i, j] = True
                    self.gpu_free[i, j] = MILLI - gpu.used_milli
            if node.gpus:
                self.node_model[i] = code[node.gpus[0].model]
        self.capacity_milli = int(self.gpu_usable.sum()) * MILLI
        self.gpu_free_total = self.gpu_free.sum(axis=1)
        # Every reservation's node, in order, and where in that log each node last
        # appears: per-node caches look only at the nodes changed since they last
        # looked (a position in the log).
        self.changes: list[int] = []
        self.changed_at = np.full(n, -1, dtype=np.int64)
        # Equal for nodes in equal states (same hardware, labels and free resources), so
        # a scorer can score one node of each state. Brought up to date when read, not
        # on every reservation: only a shape's first look reads them.
        self._state_ids: dict[tuple[Hashable, ...], int] = {}
        self._fixed = [self._fixed_key(i) for i in range(n)]
        self._state_id = np.array([self._state_key(i) for i in range(n)], dtype=np.int64)
        self._state_ids_at = 0  # the change log position they are current at
        self._eligible: dict[tuple[Hashable, ...], np.ndarray] = {}

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot) -> ClusterState:
        return cls(snapshot.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def model_mask(self, allowed: frozenset[str] | None) -> np.ndarray:
        """bool[n_models]: which of this cluster's models a constraint accepts."""
        if allowed is None:
            return np.ones(len(self.models), dtype=bool)
        return np.array([m in allowed for m in self.models], dtype=bool)

    def eligible_gpus(self, gpu: GpuRequest) -> np.ndarray:
        """bool[N, G], read-only: usable GPUs of an accepted model and memory. Computed
        once per constraint: what makes a GPU eligible never changes in a state."""
        key = (gpu.models, gpu.min_memory_gb, gpu.max_memory_gb)
        eligible = self._eligible.get(key)
        if eligible is None:
            eligible = self.gpu_usable.copy()
            if gpu.models is not None and len(self.models):
                eligible &= self.model_mask(gpu.models)[np.maximum(self.gpu_model, 0)]
            if gpu.min_memory_gb is not None:
                eligible &= self.gpu_memory_gb >= gpu.min_memory_gb
            if gpu.max_memory_gb is not None:
                eligible &= self.gpu_memory_gb <= gpu.max_memory_gb
            eligible.flags.writeable = False
            self._eligible[key] = eligible
        return eligible

    def compile(self, task: TaskRequest) -> CompiledTask:
        gpu = task.gpu
        eligible = self.eligible_gpus(gpu)
        return CompiledTask(
            request=task,
            cpu=task.cpu_milli,
            memory=task.memory_mib,
            count=gpu.gpus_touched,
            milli=gpu.milli_per_gpu if gpu.wants_gpu else 0,
            eligible=eligible,
        )

    def fitting_gpus(self, task: CompiledTask, rows: np.ndarray | int | slice = ALL) -> np.ndarray:
        """bool[..., G]: GPUs of nodes `rows` that could take the task's share now."""
        return task.eligible[rows] & (self.gpu_free[rows] >= task.milli)

    def reserve(self, node: int, gpus: list[int], milli: int, cpu: int, memory: int) -> None:
        self.cpu_free[node] -= cpu
        self.mem_free[node] -= memory
        for j in gpus:
            self.gpu_free[node, j] -= milli
        self.gpu_free_total[node] -= milli * len(gpus)
        self.changed_at[node] = len(self.changes)
        self.changes.append(node)

    def take_pool(self, node: int, pool: str, count: int = 1) -> None:
        """Count work of `pool` on `node` (after `reserve`, which logged the change)."""
        used = self.pool_used[node]
        used[pool] = used.get(pool, 0) + count

    def pool_free(self, rows: np.ndarray | slice, pool: str, limit: int) -> np.ndarray:
        """bool per node of `rows`: fewer than `limit` of `pool` run there."""
        indices = np.arange(len(self))[rows]
        return np.array([self.pool_used[i].get(pool, 0) < limit for i in indices], dtype=bool)

    def changed_since(self, seen: int) -> np.ndarray:
        """Rows of the nodes reserved on since the log held `seen` entries, in node order
        and each once; every node for `seen` -1 (a cache's first look)."""
        if seen < 0:
            return np.arange(len(self))
        recent = len(self.changes) - seen
        if not recent:
            return _NONE
        if recent <= READ_LOG_UP_TO:
            return np.array(sorted(set(self.changes[seen:])), dtype=np.int64)
        return np.flatnonzero(self.changed_at >= seen)

    def _fixed_key(self, i: int) -> tuple[Hashable, ...]:
        node = self.nodes[i]
        return (
            tuple(sorted(node.labels.items())),
            bool(self.usable[i]),
            int(self.cpu_total[i]),
            int(self.node_model[i]),
            self.gpu_model[i].tobytes(),
            self.gpu_memory_gb[i].tobytes(),
            self.gpu_usable[i].tobytes(),
        )

    def _state_key(self, i: int) -> int:
        key = (
            self._fixed[i],
            int(self.cpu_free[i]),
            int(self.mem_free[i]),
            self.gpu_free[i].tobytes(),
            tuple(sorted(self.pool_used[i].items())),
        )
        return self._state_ids.setdefault(key, len(self._state_ids))

    @property
    def state_id(self) -> np.ndarray:
        """int[N], read-only: equal for nodes in equal states."""
        for i in self.changed_since(self._state_ids_at).tolist():
            self._state_id[i] = self._state_key(i)
        self._state_ids_at = len(self.changes)
        return self._state_id

    def distinct(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(one row per distinct node state among `rows`, each row's index into those)."""
        _, first, inverse = np.unique(self.state_id[rows], return_index=True, return_inverse=True)
        return rows[first], inverse

    def release(self, node: int, gpus: list[int], milli: int, cpu: int, memory: int) -> None:
        self.reserve(node, gpus, -milli, -cpu, -memory)

    def slots(self, node: int, gpu_uuids: tuple[str, ...]) -> list[int]:
        wanted = set(gpu_uuids)
        return [j for j, gpu in enumerate(self.nodes[node].gpus) if gpu.uuid in wanted]

    def unreserve(self, placement: Placement) -> None:
        node = self.index[placement.node_id]
        self.release(
            node,
            self.slots(node, placement.gpu_uuids),
            placement.gpu_milli,
            placement.cpu_milli,
            placement.memory_mib,
        )

    def release_running(self, task: RunningTask) -> None:
        node = self.index[task.node_id]
        self.release(
            node, self.slots(node, task.gpu_uuids), task.gpu_milli, task.cpu_milli, task.memory_mib
        )

    def reserve_running(self, task: RunningTask) -> None:
        node = self.index[task.node_id]
        self.reserve(
            node, self.slots(node, task.gpu_uuids), task.gpu_milli, task.cpu_milli, task.memory_mib
        )

    @property
    def allocated_milli(self) -> int:
        return self.capacity_milli - int(self.gpu_free_total.sum())


_NONE = np.zeros(0, dtype=np.int64)
_ONE_PER_BYTE = np.uint64(0x0101010101010101)


def row_count(mask: np.ndarray) -> np.ndarray:
    """True cells per row of a bool[N, G] array, G a multiple of 8: eight booleans are
    one 64-bit word, and multiplying by 0x0101... sums its bytes into the top byte
    (an order of magnitude faster than sum(axis=1) on short rows)."""
    words = np.ascontiguousarray(mask).view(np.uint64)
    counts = (words * _ONE_PER_BYTE) >> np.uint64(56)
    return counts[:, 0] if counts.shape[1] == 1 else counts.sum(axis=1)
