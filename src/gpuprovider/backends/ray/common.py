"""What the Ray backend's parts share: names in Ray, labels, errors."""

from __future__ import annotations

from gpuprovider.backends.base import BackendUnavailable

NAMESPACE = "gpuprovider"
LABEL_NODE = "gpuprovider.io/node"  # "1" on every Ray node that serves gpuprovider
LABEL_NAME = "gpuprovider.io/name"
SIM_PREFIX = "gpuprovider.io/sim-"  # gpuprovider.io/sim-<model> = count of simulated GPUs
CLUSTER_KEY = "gpuprovider:cluster"  # in Ray's KV store: this Ray cluster serves gpuprovider


class RayBackendError(BackendUnavailable):
    """Ray cannot be used as configured; the message says what to fix."""


class BadRayAddress(RayBackendError, ValueError):
    """The address is not host:port."""


def our_node_id(ray_node_id: str) -> str:
    return "ray-" + ray_node_id[:12]


def node_labels(name: str, simulated: list[tuple[str, int]], labels: dict[str, str]) -> dict:
    """Ray node labels that make a Ray node a gpuprovider node (`node join`)."""
    made = {LABEL_NODE: "1", LABEL_NAME: name, **labels}
    made.update({f"{SIM_PREFIX}{model}": str(count) for model, count in simulated})
    return made
