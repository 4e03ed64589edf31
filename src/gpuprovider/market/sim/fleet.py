"""A simulated provider's fleet: groups of identical nodes, each GPU model priced from
the reference prices by a named key. A model without a price is refused by name,
never priced at a default."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from gpuprovider.domain import catalogue
from gpuprovider.market.sim.traces import PriceColumn
from gpuprovider.scheduler.model import GpuView, NodeView


class FleetError(ValueError):
    """A fleet the simulator cannot run; the message names the group or key."""


@dataclass(frozen=True)
class NodeGroup:
    model: str  # catalogue model id
    price_key: str  # its row in reference-prices.csv
    nodes: int
    gpus_per_node: int
    cpu_cores: int
    memory_gb: int


# The example fleet: 2 x 8 H100, 4 x 8 A100, 8 x 4 RTX 4090, 8 x 4 RTX 3090.
DEFAULT_FLEET: tuple[NodeGroup, ...] = (
    NodeGroup("h100-80gb-sxm", "h100-sxm", 2, 8, 192, 2048),
    NodeGroup("a100-80gb-sxm", "a100-80gb", 4, 8, 128, 1024),
    NodeGroup("rtx-4090-24gb", "rtx-4090", 8, 4, 64, 512),
    NodeGroup("rtx-3090-24gb", "rtx-3090", 8, 4, 64, 512),
)


def scaled(fleet: Sequence[NodeGroup], factor: int) -> tuple[NodeGroup, ...]:
    """The same mix with `factor` times the nodes (factor 9: 1,008 GPUs)."""
    if factor < 1:
        raise FleetError(f"fleet scale must be at least 1, not {factor}")
    return tuple(replace(g, nodes=g.nodes * factor) for g in fleet)


def check(fleet: Sequence[NodeGroup]) -> None:
    if not fleet:
        raise FleetError("the fleet has no node groups")
    for n, group in enumerate(fleet, start=1):
        where = f"fleet group {n} ({group.model})"
        if group.model not in catalogue.models():
            raise FleetError(f"{where}: {group.model!r} is not a catalogue model id")
        if group.nodes < 1 or group.gpus_per_node < 1 or group.gpus_per_node > 16:
            raise FleetError(f"{where}: needs at least one node of 1 to 16 GPUs")
        if group.cpu_cores < 1 or group.memory_gb < 1:
            raise FleetError(f"{where}: needs CPU cores and memory")


def gpu_prices(
    fleet: Sequence[NodeGroup],
    prices: Mapping[str, Mapping[str, float]],
    column: str,
    fallback: str | None = None,
) -> dict[str, float]:
    """USD per GPU-hour for each of the fleet's models, from `column` (else `fallback`)."""
    found: dict[str, float] = {}
    for group in fleet:
        for source in (column, fallback):
            if source and group.price_key in prices.get(source, {}):
                found[group.model] = prices[source][group.price_key]
                break
        else:
            sources = " or ".join(c for c in (column, fallback) if c)
            raise FleetError(
                f"fleet model {group.model}: no price for key {group.price_key!r} in the "
                f"reference prices ({sources}); add it or choose another price_key"
            )
    return found


REFERENCE_COLUMN = PriceColumn.VAST  # what renters pay on a spot market
REFERENCE_FALLBACK = PriceColumn.CHUTES


def build_nodes(fleet: Sequence[NodeGroup], prefix: str) -> list[NodeView]:
    nodes = []
    for group in fleet:
        memory_gb = catalogue.models()[group.model].memory_gb
        short = group.model.split("-")[0] if not group.model.startswith("rtx") else group.model[:8]
        for k in range(group.nodes):
            node_id = f"{prefix}{short}-{k:03d}"
            gpus = [
                GpuView(f"{node_id}-{j}", j, group.model, memory_gb)
                for j in range(group.gpus_per_node)
            ]
            nodes.append(
                NodeView(node_id, node_id, group.cpu_cores * 1000, group.memory_gb * 1024, gpus)
            )
    return nodes


def gpu_count(fleet: Sequence[NodeGroup]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for group in fleet:
        counts[group.model] = counts.get(group.model, 0) + group.nodes * group.gpus_per_node
    return counts
