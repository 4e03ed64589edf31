"""The daemon's side of each market: one thread reads the hub's event stream (and
registers first), another keeps leases in step (task states, usage, heartbeats)."""

from __future__ import annotations

import logging

from gpuprovider.daemon.loops import Loop
from gpuprovider.market.client import MarketRefused, MarketUnreachable
from gpuprovider.service.market import MarketService

log = logging.getLogger(__name__)

RETRY_S = 3.0  # after the hub could not be reached


class MarketReader(Loop):
    """Registers with the hub, then follows its events from the saved cursor; when the
    stream ends or breaks, reconnects (resuming where it stopped)."""

    def __init__(self, market: MarketService):
        super().__init__(f"market-{market.market}-events", RETRY_S)
        self.market = market

    def tick(self) -> float | None:
        try:
            if not self.market.registered:
                self.market.register()
            for event in self.market.connector.events(self.market.cursor()["last_event"]):
                self.market.handle(event)
                if self._stopping.is_set():
                    return None
        except (MarketUnreachable, MarketRefused) as exc:
            log.warning("market %s: %s; retrying in %.0f s", self.market.market, exc, RETRY_S)
            return RETRY_S
        return 0.2  # the stream ended: reconnect

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping.set()
        self.market.connector.close()  # unblocks a stream read
        super().stop(timeout_s)


class MarketBeat(Loop):
    def __init__(self, market: MarketService):
        super().__init__(f"market-{market.market}-beat", market.settings.heartbeat_s)
        self.market = market

    def tick(self) -> float | None:
        self.market.beat()
        return None


class MarketKeeper(Loop):
    def __init__(self, market: MarketService):
        super().__init__(f"market-{market.market}-leases", 0.2)
        self.market = market

    def tick(self) -> float | None:
        self.market.maintain()
        return None
