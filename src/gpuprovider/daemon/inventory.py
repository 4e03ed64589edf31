"""The inventory loop: the backend's nodes, registered and kept current (hardware and
heartbeat every `interval_s`; liveness more often where the backend can lose nodes)."""

from __future__ import annotations

import logging
import time

from gpuprovider.backends.base import Backend, BackendUnavailable
from gpuprovider.daemon.loops import Loop
from gpuprovider.lifecycle.nodes import node_lost, node_seen
from gpuprovider.store.store import Store

log = logging.getLogger(__name__)
RETRY_S = 5.0  # after the backend could not be asked at all


class InventoryLoop(Loop):
    """Trouble with the backend is logged once and retried; the daemon keeps serving
    the API meanwhile."""

    def __init__(self, store: Store, backend: Backend, interval_s: float):
        super().__init__("inventory", interval_s)
        self.store, self.backend = store, backend
        self.problem = ""
        self._full_due = 0.0
        self._retry_s = 0.5

    def tick(self) -> float | None:
        now = time.monotonic()
        full = now >= self._full_due
        try:
            found = self.backend.discover(full)
        except BackendUnavailable as exc:
            if str(exc) != self.problem:
                log.error("%s", exc)
            self.problem = str(exc)
            self._full_due = 0.0
            return RETRY_S
        self.problem = ""
        # nodes that could not answer, or whose agents are new, are asked again soon,
        # then less often
        if full:
            self._retry_s = min(self._retry_s * 2, self.interval_s) if found.unanswered else 0.5
            self._full_due = now + (self._retry_s if found.unanswered else self.interval_s)
        elif found.unanswered:
            self._full_due = min(self._full_due, now + self._retry_s)
        with self.store.tx() as tx:
            for node in found.nodes:
                node_seen(tx, node)
            lost = dict(found.lost)
            if full and not found.unanswered:  # every node there answered: the rest is gone
                seen = {node.id for node in found.nodes}
                for node in tx.nodes.list():
                    if node.backend == self.backend.name and node.id not in seen | lost.keys():
                        lost[node.id] = f"the {self.backend.name} backend no longer finds it"
            for node_id, why in lost.items():
                if node_lost(tx, node_id, why):
                    log.warning("node %s is unreachable: %s", node_id, why)
        return self.backend.liveness_interval_s
