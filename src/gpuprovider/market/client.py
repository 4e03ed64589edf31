"""A client of the reference hub: every request signed with one Ed25519 key (a
provider's node key, or a tenant's key), and the server-sent event stream with resume."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gpuprovider.domain.wire import parse_json
from gpuprovider.identity.signing import sign_request


class MarketUnreachable(RuntimeError):
    """The market did not answer (down, refused the connection, timed out)."""


class MarketRefused(RuntimeError):
    """The market answered with an error (the message is the market's), or with
    something that is not an answer. `details`: what else its error said."""

    def __init__(self, status: int, message: str, details: dict[str, Any] | None = None):
        super().__init__(f"hub: {status} {message}")
        self.status = status
        self.details = details or {}


@dataclass
class Event:
    seq: int
    kind: str
    data: dict[str, Any]


class HubClient:
    def __init__(self, url: str, key: Ed25519PrivateKey, timeout_s: float = 10.0):
        self.url = url.rstrip("/")
        self.key = key
        self.http = httpx.Client(base_url=self.url, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def _signed(
        self, method: str, path: str, body: Any = None, timeout: httpx.Timeout | None = None
    ) -> httpx.Request:
        content = json.dumps(body).encode() if body is not None else b""
        headers = sign_request(self.key, method, path, content)
        if content:
            headers["Content-Type"] = "application/json"
        return self.http.build_request(
            method,
            path,
            content=content,
            headers=headers,
            timeout=timeout if timeout else httpx.USE_CLIENT_DEFAULT,
        )

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """The hub's JSON answer. MarketUnreachable when it does not answer in time,
        MarketRefused when it refuses (with what its error says) or answers something
        that is not JSON, nested too deep, or too large."""
        try:
            response = self.http.send(self._signed(method, path, body))
        except httpx.TransportError as exc:
            raise MarketUnreachable(f"hub {self.url}: {exc.__class__.__name__}") from None
        try:
            answer = parse_json(response.content)
        except ValueError as exc:
            raise MarketRefused(response.status_code, f"answered badly: {exc}") from None
        if response.status_code >= 400:
            if isinstance(answer, dict):
                message = str(answer.get("error", ""))[:1000] or response.reason_phrase
                raise MarketRefused(response.status_code, message, answer)
            raise MarketRefused(response.status_code, response.text[:300])
        return answer

    def info(self) -> dict[str, Any]:
        try:
            info: dict[str, Any] = self.http.get("/v1/info").json()
            return info
        except (httpx.TransportError, ValueError) as exc:
            raise MarketUnreachable(f"hub {self.url}: {exc.__class__.__name__}") from None

    def events(self, after: int, timeout_s: float = 30.0) -> Iterator[Event]:
        """Events after `after`, as they come; ends when the stream does (reconnect with
        the last seq seen). A malformed event ends the stream too."""
        path = f"/v1/events?after={after}"
        request = self._signed("GET", path, timeout=httpx.Timeout(5.0, read=timeout_s))
        request.headers["Last-Event-ID"] = str(after)
        try:
            response = self.http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise MarketUnreachable(f"hub {self.url}: {exc.__class__.__name__}") from None
        try:
            if response.status_code >= 400:
                response.read()
                raise MarketRefused(response.status_code, response.text[:300])
            fields: dict[str, str] = {}
            for line in response.iter_lines():
                if line == "":
                    if "data" in fields:
                        try:
                            yield Event(
                                int(fields["id"]),
                                fields.get("event", "message"),
                                json.loads(fields["data"]),
                            )
                        except (KeyError, ValueError):
                            return
                    fields = {}
                elif not line.startswith(":") and ":" in line:
                    name, _, value = line.partition(":")
                    fields[name] = value.removeprefix(" ")
        except httpx.TransportError:
            return
        finally:
            response.close()
