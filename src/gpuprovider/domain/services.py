"""The service state machine, as one table (the task and node machines' sibling)."""

from __future__ import annotations

from enum import StrEnum


class ServiceState(StrEnum):
    STARTING = "starting"  # no replica has run yet
    LIVE = "live"  # a replica has run; kept at its wanted size
    STOPPING = "stopping"  # its replicas are being stopped; its name is free again
    STOPPED = "stopped"  # no replica runs


V = ServiceState
SERVICE_TRANSITIONS: dict[ServiceState, frozenset[ServiceState]] = {
    V.STARTING: frozenset({V.LIVE, V.STOPPING}),
    V.LIVE: frozenset({V.STOPPING}),
    V.STOPPING: frozenset({V.STOPPED}),
    V.STOPPED: frozenset(),
}
# Kept at its wanted size, and its name taken.
ACTIVE = frozenset({V.STARTING, V.LIVE})
