"""What the provider needs of a market, whatever the market: the connector interface,
and the reference hub's connector.

A pull market (the hub, Akash) is read through `events`; a push market (Swan's job
API) calls routes the daemon mounts, which hand its orders to the same code and read the
decision `respond` recorded. Either way the provider reports state and usage, and reads
what it was paid, where the market says.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gpuprovider.market.client import Event, HubClient
from gpuprovider.market.model import Action, Decision
from gpuprovider.market.usage import Usage


class Connector(Protocol):
    """Every method raises MarketUnreachable or MarketRefused (market/client.py) when the
    market cannot be reached or says no."""

    pushes: bool  # work arrives at routes on the daemon: this provider ends leases itself

    def register(self, name: str, api_url: str, verify_token: str) -> dict[str, Any]:
        """Join the market; its answer has `status` and `status_reason`."""

    def beat(self) -> dict[str, Any]:
        """Say this provider is alive; the market's view of it (status, reliability)."""

    def events(self, after: int) -> Iterator[Event]:
        """What the market says (orders, wins, losses, closes), after `after`."""

    def respond(self, order_id: str, mode: str, decision: Decision) -> None:
        """Bid, accept or decline an order."""

    def report_state(self, lease_id: str, state: str, **details: Any) -> dict[str, Any]:
        """A lease's state as the provider sees it; the market's view of the lease."""

    def report_usage(self, usage: Usage) -> None:
        """One sealed usage record."""

    def paid(self) -> int | None:
        """What the market has paid this provider so far (micros), if it says."""

    def close(self) -> None:
        """Stop: unblock a reader waiting on `events`."""


class HubConnector:
    """The reference hub, over signed HTTP and its event stream."""

    pushes = False

    def __init__(self, url: str, key: Ed25519PrivateKey):
        self.client = HubClient(url, key)

    def register(self, name: str, api_url: str, verify_token: str) -> dict[str, Any]:
        body = {"name": name, "api_url": api_url, "verify_token": verify_token}
        answer: dict[str, Any] = self.client.call("POST", "/v1/providers", body)
        return answer

    def beat(self) -> dict[str, Any]:
        answer = self.client.call("POST", "/v1/providers/heartbeat")
        return answer if isinstance(answer, dict) else {}

    def events(self, after: int) -> Iterator[Event]:
        return self.client.events(after)

    def respond(self, order_id: str, mode: str, decision: Decision) -> None:
        if mode == "dispatch":
            body = {
                "accept": decision.action == Action.ACCEPT,
                "price_per_hour": decision.price_per_hour,
                "reason": decision.reason[:500],
            }
            self.client.call("POST", f"/v1/orders/{order_id}/dispatch", body)
        elif decision.action == Action.BID:
            valid_s = max(1.0, decision.expires_at - time.time())
            body = {"price_per_hour": decision.price_per_hour, "valid_s": min(valid_s, 3600)}
            self.client.call("POST", f"/v1/orders/{order_id}/bids", body)
        # an auction's decline needs no answer: the hub decides without this bid

    def report_state(self, lease_id: str, state: str, **details: Any) -> dict[str, Any]:
        answer = self.client.call(
            "POST", f"/v1/leases/{lease_id}/state", {"state": state, **details}
        )
        return answer if isinstance(answer, dict) else {}

    def report_usage(self, usage: Usage) -> None:
        self.client.call("POST", f"/v1/leases/{usage.lease_id}/usage", usage.model_dump())

    def paid(self) -> int | None:
        answer = self.client.call("GET", "/v1/me")
        balance = answer.get("balance") if isinstance(answer, dict) else None
        return balance if isinstance(balance, int) else None

    def close(self) -> None:
        self.client.close()


class PushConnector:
    """A market that pushes work to routes on the daemon (Swan's job API): nothing to
    join, beat or read; the route answers with the decision itself. The market has no
    API for state, usage or payment (Swan pays on chain for the duration), so those
    stay in this provider's own records."""

    pushes = True

    def register(self, name: str, api_url: str, verify_token: str) -> dict[str, Any]:
        return {"status": "admitted", "status_reason": "work is pushed to this provider"}

    def beat(self) -> dict[str, Any]:
        return {}

    def events(self, after: int) -> Iterator[Event]:
        return iter(())

    def respond(self, order_id: str, mode: str, decision: Decision) -> None:
        pass  # the route that brought the order answers with the decision

    def report_state(self, lease_id: str, state: str, **details: Any) -> dict[str, Any]:
        return {"running_at": time.time()} if state == "running" else {}

    def report_usage(self, usage: Usage) -> None:
        pass

    def paid(self) -> int | None:
        return None

    def close(self) -> None:
        pass
