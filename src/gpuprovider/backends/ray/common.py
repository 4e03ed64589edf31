"""What the Ray backend's parts share: names in Ray, labels, errors."""

from __future__ import annotations

import os
import sys

from gpuprovider.backends.base import BackendUnavailable

NAMESPACE = "gpuprovider"
LABEL_NODE = "gpuprovider.io/node"  # "1" on every Ray node that serves gpuprovider
LABEL_NAME = "gpuprovider.io/name"
SIM_PREFIX = "gpuprovider.io/sim-"  # gpuprovider.io/sim-<model> = count of simulated GPUs
CLUSTER_KEY = "gpuprovider:cluster"  # in Ray's KV store: this Ray cluster serves gpuprovider


# A Ray driver whose GCS stays away longer than this ends its whole process (exit 1;
# Ray's default: 60 s). The provider outlives any outage: its API serves meanwhile, and
# it finds its nodes again when the GCS returns (with GCS fault tolerance, the same
# cluster).
GCS_RECONNECT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"
GCS_RECONNECT_S = 10 * 365 * 86400
_operators: dict[str, str] = {}  # the value the operator had set, for `ray start`
_in_time: list[bool] = []  # set before Ray was imported here (asked once)


def outlive_gcs_outages() -> bool:
    """Make this process's Ray driver wait for its GCS as long as it is away. Takes
    effect only before Ray is first imported in the process (Ray reads it then): False
    when Ray was imported first without it, and a GCS outage of a minute would still end
    the process."""
    if not _in_time:
        ours = os.environ.get(GCS_RECONNECT_ENV) == str(GCS_RECONNECT_S)
        _in_time.append(ours or "ray" not in sys.modules)
        if GCS_RECONNECT_ENV in os.environ and not ours:
            _operators[GCS_RECONNECT_ENV] = os.environ[GCS_RECONNECT_ENV]
        os.environ[GCS_RECONNECT_ENV] = str(GCS_RECONNECT_S)
    return _in_time[0]


def ray_node_env() -> dict[str, str]:
    """The environment for `ray start` (a Ray node of its own, not the provider's
    driver): Ray's own GCS timeout, as the operator set it or Ray's default."""
    env = dict(os.environ)
    if env.get(GCS_RECONNECT_ENV) == str(GCS_RECONNECT_S):
        del env[GCS_RECONNECT_ENV]
    return env | _operators


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
