"""The daemon's side of each market: one thread reads the hub's event stream (and
registers first), one beats, one reports leases' states and usage to the market."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gpuprovider.config import HubMarketConfig, ProviderConfig, SwanMarketConfig
from gpuprovider.daemon.loops import Loop
from gpuprovider.market.client import MarketRefused, MarketUnreachable
from gpuprovider.market.connector import Connector, HubConnector, PushConnector
from gpuprovider.service.market import REPORT_IDLE_S, MarketService, MarketSettings
from gpuprovider.service.swan import SwanService, SwanSettings

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
            if isinstance(exc, MarketRefused) and exc.status in (401, 403, 404):
                self.market.registered = False  # the hub forgot us (restarted empty): join again
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


class MarketReporter(Loop):
    """Tells the market what changed: woken by its leases' transitions (they signal
    LEASES), and when usage or a retry is due; also ends leases whose time ran out
    here. Reads only the leases the market must still hear of, never every lease."""

    def __init__(self, market: MarketService):
        super().__init__(f"market-{market.market}-reports", REPORT_IDLE_S)
        self.market = market

    def tick(self) -> float | None:
        self.market.expire()
        return self.market.report()


# -- market kinds: what each `[market.<name>] kind` brings ------------------------------


@dataclass
class Joined:
    """What a market adds to the daemon: its loops, and a push market's routes."""

    loops: list[Loop] = field(default_factory=list)
    swan: SwanService | None = None


@dataclass(frozen=True)
class MarketKind:
    connector: Callable[[Any, Ed25519PrivateKey], Connector]
    join: Callable[[Any, MarketService], Joined]


def settings_for(name: str, section: Any, config: ProviderConfig) -> MarketSettings:
    """A market's settings from its section (a push market has no hub to reach)."""
    node = config.inventory.node_name or socket.gethostname()
    hub = section if isinstance(section, HubMarketConfig) else None
    return MarketSettings(
        name=name,
        url=hub.url if hub else "",
        api_url=(hub.api_url if hub else "") or f"http://{config.api.host}:{config.api.port}",
        provider_name=(hub.provider_name if hub else "")
        or re.sub(r"[^A-Za-z0-9_.-]", "-", node)[:64],
        priority=section.priority,
        heartbeat_s=hub.heartbeat_s if hub else 10.0,
        usage_interval_s=section.usage_interval_s,
        bid_valid_s=hub.bid_valid_s if hub else 60.0,
        strategy=section.strategy,
    )


def _join_hub(section: HubMarketConfig, market: MarketService) -> Joined:
    return Joined([MarketReader(market), MarketBeat(market), MarketReporter(market)])


def _join_swan(section: SwanMarketConfig, market: MarketService) -> Joined:
    market.register()  # nothing to reach: only routes to serve
    swan = SwanService(
        market,
        SwanSettings(
            orchestrator=section.orchestrator.lower(),
            cp_account=section.cp_account,
            node_id=section.node_id,
            token_price=section.token_price,
            source_hosts=frozenset(h.lower() for h in section.source_hosts),
        ),
    )
    return Joined([MarketReporter(market)], swan)


MARKET_KINDS: dict[str, MarketKind] = {
    "hub": MarketKind(lambda section, key: HubConnector(section.url, key), _join_hub),
    "swan": MarketKind(lambda section, key: PushConnector(), _join_swan),
}
