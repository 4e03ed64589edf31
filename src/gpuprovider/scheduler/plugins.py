"""Policies as plugins for the framework's extension points."""

from __future__ import annotations

from gpuprovider.scheduler.framework import GPU_SHORT, Policy, fitting_gpus
from gpuprovider.scheduler.model import GpuView, NodeView, TaskRequest

# -- filters ----------------------------------------------------------------


def node_usable(node: NodeView, task: TaskRequest) -> str | None:
    return node.unusable_reason or None


def node_selector(node: NodeView, task: TaskRequest) -> str | None:
    for key, value in task.node_selector:
        if node.labels.get(key) != value:
            return f"label {key}={value} not set"
    return None


def cpu_fits(node: NodeView, task: TaskRequest) -> str | None:
    if task.cpu_milli > node.free_cpu_milli:
        return (
            f"not enough free CPU ({node.free_cpu_milli / 1000:g} of "
            f"{task.cpu_milli / 1000:g} cores asked)"
        )
    return None


def memory_fits(node: NodeView, task: TaskRequest) -> str | None:
    if task.memory_mib > node.free_memory_mib:
        return f"not enough free memory ({node.free_memory_mib} of {task.memory_mib} MiB asked)"
    return None


def gpus_fit(node: NodeView, task: TaskRequest) -> str | None:
    if task.gpu.wants_gpu and len(fitting_gpus(node, task)) < task.gpu.gpus_touched:
        return GPU_SHORT
    return None


DEFAULT_FILTERS = (node_usable, node_selector, cpu_fits, memory_fits, gpus_fit)

# -- scorers ----------------------------------------------------------------


def _free_gpu_milli(node: NodeView) -> int:
    return sum(g.free_milli for g in node.gpus)


def score_pack(node: NodeView, task: TaskRequest) -> float:
    """Best fit: the node left with the least free GPU (then CPU) wins."""
    return -(_free_gpu_milli(node) * 1e6 + node.free_cpu_milli)


def score_spread(node: NodeView, task: TaskRequest) -> float:
    return -score_pack(node, task)


def score_first(node: NodeView, task: TaskRequest) -> float:
    return 0.0


# -- GPU pickers ------------------------------------------------------------


def pick_packed(node: NodeView, task: TaskRequest) -> list[GpuView]:
    """Fill the GPU with the least room first, so whole GPUs stay whole."""
    candidates = sorted(fitting_gpus(node, task), key=lambda g: (g.free_milli, g.index))
    return candidates[: task.gpu.gpus_touched]


def pick_spread(node: NodeView, task: TaskRequest) -> list[GpuView]:
    candidates = sorted(fitting_gpus(node, task), key=lambda g: (-g.free_milli, g.index))
    return candidates[: task.gpu.gpus_touched]


def pick_first(node: NodeView, task: TaskRequest) -> list[GpuView]:
    return sorted(fitting_gpus(node, task), key=lambda g: g.index)[: task.gpu.gpus_touched]


POLICIES: dict[str, Policy] = {
    "best-fit": Policy("best-fit", DEFAULT_FILTERS, score_pack, pick_packed),
    "first-fit": Policy("first-fit", DEFAULT_FILTERS, score_first, pick_first),
    "spread": Policy("spread", DEFAULT_FILTERS, score_spread, pick_spread),
}


def policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown scheduler policy {name!r}; choose one of {', '.join(POLICIES)}"
        ) from None
