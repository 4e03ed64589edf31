"""The router: an ASGI reverse proxy for services, in its own process so that proxied
traffic never competes with the API's event loop.

- Routes by Host (`<service>.<domain>`, `<service>.localhost`) or by path
  (`/s/<service>/...`, the prefix stripped), from the daemon's route table, fetched
  every `refresh_s`.
- Streams both ways without buffering (aiohttp to the replicas: httpx's connection
  pool slows down under many concurrent requests) (`X-Accel-Buffering: no` for an nginx in
  front), tunnels WebSockets, balances to the ready replica with the fewest requests in
  flight (counted in a `finally`: never leaked, never negative), keeps a client on its
  replica by cookie when the service asks, takes a replica out on a connect error and
  retries a request without a body on another, before any byte went back.
- Checks tokens at the edge (the tenant's tokens, admin's, and per-service tokens with
  scope `service:<name>`; SHA-256 compared in constant time); no provider token reaches
  a replica however it is spelled, in any header; a public service's replica gets the
  caller's own `Authorization` only when no provider token is in it. Headers that say
  who the caller is (`Forwarded`, `X-Real-IP`, `X-Forwarded-*`, `True-Client-IP`, ...)
  are the router's own: a caller's are dropped, a trusted proxy's (nginx in front)
  believed. Per-service rate and body limits (413, streamed bodies too); 404 for an
  unknown service, 503 with Retry-After when none is ready.
- A caller that goes away has its request cancelled at once (the edge protocol tells
  it, see `gateway/edge.py`): its replica's in-flight slot is free and the replica sees
  the upstream connection close.
- Probes readiness itself (HTTP path or TCP), and reports each service's figures over
  30/60/300 s to the daemon every second (they drive the autoscaler)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import random
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import httpx
import websockets
import yarl
from multidict import CIMultiDict

from gpuprovider.gateway.edge import call_of

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
WINDOWS_S = (30, 60, 300)
EJECT_S = 5.0  # a replica that refused a connection gets no traffic this long
RETRIES = 2
# Headers that say who called: only the router says it to a replica. From a trusted
# proxy (nginx in front) it believes these, which that proxy sets itself...
FROM_PROXY = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip"}
)
# ...and drops these (and any X-Forwarded-*) from anyone: whoever set them, the router
# cannot vouch for them, and replicas' frameworks believe some of them by default.
CLIENT_IDENTITY = frozenset(
    {
        b"forwarded",
        b"x-real-ip",
        b"x-client-ip",
        b"client-ip",
        b"true-client-ip",
        b"cf-connecting-ip",
        b"cf-connecting-ipv6",
        b"fastly-client-ip",
        b"akamai-client-ip",
        b"x-cluster-client-ip",
        b"x-original-forwarded-for",
        b"x-originating-ip",
        b"x-remote-ip",
        b"x-remote-addr",
        b"x-proxyuser-ip",
        b"x-envoy-external-address",
        b"x-azure-clientip",
        b"x-azure-socketip",
        b"x-appengine-user-ip",
    }
)
BEARER = re.compile(r"^[ \t]*bearer[ \t]+([^ \t]+)[ \t]*$", re.IGNORECASE)
# identity/keys.py's new_token(): dropped by its shape, known to this router or not (the
# route table holds only tokens that may call services, not metrics or verify ones, nor
# one revoked a moment ago that another daemon on the store still honours)
PROVIDER_TOKEN = re.compile(rb"gpp_[A-Za-z0-9_-]{43}")
TOKEN_WORD = re.compile(rb"[A-Za-z0-9._~+/=:-]{16,512}")  # what could be a token in a header
MAX_AUTHORIZATION_WORDS = 16  # a public replica's own scheme needs fewer; more is dropped
NO_BODY = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
STICKY_COOKIE = "gpp_replica"
STICKY_HEADER = b"x-gpp-replica"  # a client may name its replica (the task id) itself


@dataclass
class Replica:
    task_id: str
    address: str
    port: int
    ready: bool = False
    draining: bool = False  # no new requests: the daemon stops it once none is in flight
    in_flight: int = 0
    ejected_until: float = 0.0
    probed_at: float = 0.0

    @property
    def base(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    def usable(self, now: float) -> bool:
        return self.ready and not self.draining and now >= self.ejected_until


SAMPLES_PER_SECOND = 64


@dataclass
class _Second:
    at: int
    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)  # a uniform sample of the second's
    ttfbs: list[float] = field(default_factory=list)


@dataclass
class Figures:
    """A service's requests over the last 300 s, one bucket a second: counting and
    summing cost the same whatever the traffic (a sample of each second's latencies)."""

    seconds: deque[_Second] = field(default_factory=lambda: deque(maxlen=WINDOWS_S[-1] + 1))
    total: int = 0  # every request since the router started (what market usage counts)

    def add(self, latency: float, ttfb: float, error: bool) -> None:
        self.total += 1
        now = int(time.monotonic())
        if not self.seconds or self.seconds[-1].at != now:
            self.seconds.append(_Second(now))
        second = self.seconds[-1]
        second.requests += 1
        second.errors += error
        if len(second.latencies) < SAMPLES_PER_SECOND:
            second.latencies.append(latency)
            second.ttfbs.append(ttfb)
        elif (slot := random.randrange(second.requests)) < SAMPLES_PER_SECOND:
            second.latencies[slot], second.ttfbs[slot] = latency, ttfb  # reservoir sampling

    def summary(self) -> dict[str, Any]:
        now = int(time.monotonic())
        out: dict[str, Any] = {
            "requests": {},
            "errors": {},
            "rps": {},
            "latency_p50_ms": {},
            "ttfb_p50_ms": {},
            "total": self.total,
        }
        for window in WINDOWS_S:
            recent = [s for s in self.seconds if s.at > now - window]
            key = f"{window}s"
            requests = sum(s.requests for s in recent)
            out["requests"][key] = requests
            out["errors"][key] = sum(s.errors for s in recent)
            out["rps"][key] = round(requests / window, 3)
            out["latency_p50_ms"][key] = _p50_ms([v for s in recent for v in s.latencies])
            out["ttfb_p50_ms"][key] = _p50_ms([v for s in recent for v in s.ttfbs if v])
        return out


def _p50_ms(values: list[float]) -> float | None:
    if not values:
        return None
    return round(sorted(values)[len(values) // 2] * 1000, 2)


@dataclass
class Route:
    name: str
    tenant: str
    auth: str
    sticky: bool
    max_body_bytes: int
    rate_per_s: float | None
    readiness: dict[str, Any]
    replicas: dict[str, Replica] = field(default_factory=dict)
    figures: Figures = field(default_factory=Figures)
    tokens: float = 0.0  # the rate limit's bucket
    filled_at: float = 0.0

    def admit(self, now: float) -> bool:
        """Token bucket: `rate_per_s`, bursts of one second's worth."""
        if self.rate_per_s is None:
            return True
        burst = max(1.0, self.rate_per_s)
        self.tokens = min(burst, self.tokens + (now - self.filled_at) * self.rate_per_s)
        self.filled_at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def pick(self, now: float, sticky_to: str | None, tried: set[str]) -> Replica | None:
        usable = [r for r in self.replicas.values() if r.usable(now) and r.task_id not in tried]
        if not usable:
            return None
        if sticky_to:
            for replica in usable:
                if replica.task_id == sticky_to:
                    return replica
        fewest = min(r.in_flight for r in usable)
        return random.choice([r for r in usable if r.in_flight == fewest])


class Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Router:
    def __init__(
        self,
        daemon_url: str,
        token: str,
        domain: str = "",
        read_timeout_s: float = 3600.0,
        refresh_s: float = 0.5,
        trusted_proxies: frozenset[str] = frozenset({"127.0.0.1", "::1"}),
    ):
        self.daemon_url, self.token = daemon_url.rstrip("/"), token
        self.domain = domain.lower().strip(".")
        self.read_timeout_s, self.refresh_s = read_timeout_s, refresh_s
        self.trusted_proxies = trusted_proxies
        self.routes: dict[str, Route] = {}
        self.started = time.time()  # with each route's total: requests are metered from it
        self.token_hashes: dict[str, list[str]] = {}
        self.every_token_hash: frozenset[str] = frozenset()  # of every tenant, for stripping
        self._tasks: list[asyncio.Task] = []
        self._upstream: aiohttp.ClientSession | None = None
        self._daemon: httpx.AsyncClient | None = None

    # -- ASGI ------------------------------------------------------------------------

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def start(self) -> None:
        self._upstream = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=10, sock_read=self.read_timeout_s
            ),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            auto_decompress=False,
        )
        self._daemon = httpx.AsyncClient(
            base_url=self.daemon_url + "/api/v1",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10.0,
        )
        self._tasks = [
            asyncio.create_task(self._refresh_forever()),
            asyncio.create_task(self._probe_forever()),
            asyncio.create_task(self._report_forever()),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._upstream is not None:
            await self._upstream.close()
        if self._daemon is not None:
            await self._daemon.aclose()

    # -- which service -----------------------------------------------------------------

    def resolve(self, scope: dict) -> tuple[str | None, str]:
        """(service name, the path to send upstream)."""
        path = scope.get("path") or "/"
        host = ""
        for key, value in scope.get("headers", []):
            if key == b"host":
                host = value.decode("latin-1").lower().rsplit(":", 1)[0]
                if host.startswith("[") or host.count(":") > 0:
                    host = ""
                break
        for suffix in ([f".{self.domain}"] if self.domain else []) + [".localhost"]:
            if host.endswith(suffix) and host != suffix[1:]:
                label = host[: -len(suffix)]
                if "." not in label:
                    return label, path
        if path.startswith("/s/"):
            name, _, rest = path[3:].partition("/")
            return name or None, "/" + rest
        return None, path

    def _authorise(self, route: Route, headers: list[tuple[bytes, bytes]]) -> None:
        if route.auth == "public":
            return
        bearer = ""
        for key, value in headers:
            if key == b"authorization":
                bearer = bearer_token(value) or ""
                break
        if not bearer:
            raise Refused(
                401,
                f"service {route.name} needs a token: send 'Authorization: Bearer <token>'",
                {"WWW-Authenticate": "Bearer"},
            )
        presented = hashlib.sha256(bearer.encode()).hexdigest()
        allowed = [
            *self.token_hashes.get(route.tenant, []),
            *self.token_hashes.get(f"service:{route.name}:{route.tenant}", []),
            *self.token_hashes.get("*", []),
        ]
        # constant time against each candidate: no timing tells how close a guess was
        if not any(hmac.compare_digest(presented, candidate) for candidate in allowed):
            raise Refused(403, f"this token may not call service {route.name}")

    def _route_for(self, scope: dict) -> tuple[Route, str]:
        name, path = self.resolve(scope)
        if name is None:
            raise Refused(
                404, "no service named here: use http://<service>.localhost/ or /s/<service>/"
            )
        route = self.routes.get(name)
        if route is None:
            raise Refused(404, f"no service {name!r}")
        self._authorise(route, scope.get("headers", []))
        return route, path

    @staticmethod
    def _admit(route: Route) -> None:
        if not route.admit(time.monotonic()):
            raise Refused(
                429,
                f"service {route.name} allows {route.rate_per_s:g} requests/s",
                {"Retry-After": "1"},
            )

    # -- HTTP --------------------------------------------------------------------------

    async def _http(self, scope: dict, receive: Any, send: Any) -> None:
        call = call_of(scope)
        if call is not None:
            if call.gone:  # went away before this task ran
                return
            call.task = asyncio.current_task()
        try:
            await self._proxy(scope, receive, send)
        except asyncio.CancelledError:
            if call is None or not call.gone:
                raise
            # the caller went away (the edge cancelled us): the `finally`s on the way
            # here freed its replica's slot and closed the upstream request; nothing is
            # left to answer, so the cancellation ends here
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()

    async def _proxy(self, scope: dict, receive: Any, send: Any) -> None:
        began = time.monotonic()
        headers = scope.get("headers", [])
        length = _content_length(headers)
        try:
            route, path = self._route_for(scope)
            if length is not None and length > route.max_body_bytes:
                limit = route.max_body_bytes
                raise Refused(413, f"service {route.name} takes bodies up to {limit} bytes")
            self._admit(route)  # after the size check: a refused body costs no rate
        except Refused as refused:
            await _plain(send, refused.status, refused.message, refused.headers)
            return
        sticky_to = None
        if route.sticky:  # by the router's cookie, or by the client's own header
            sticky_to = _cookie(headers, f"{STICKY_COOKIE}_{route.name}") or _header(
                headers, STICKY_HEADER
            )
        method = scope["method"]
        retryable = method in NO_BODY and not length and not _chunked(headers)
        tried: set[str] = set()
        while True:
            replica = route.pick(time.monotonic(), sticky_to, tried)
            if replica is None:
                what = "no ready replica" if not tried else "no replica that answers"
                message = f"service {route.name} has {what}; try again shortly"
                await _plain(send, 503, message, {"Retry-After": "1"})
                route.figures.add(time.monotonic() - began, 0.0, True)
                return
            tried.add(replica.task_id)
            replica.in_flight += 1
            try:
                outcome = await self._forward(
                    scope, receive, send, route, replica, path, retryable, began
                )
            finally:
                replica.in_flight -= 1
            if outcome != "retry" or len(tried) > RETRIES:
                if outcome == "retry":
                    message = f"service {route.name}: no replica answered"
                    await _plain(send, 502, message, {"Retry-After": "1"})
                    route.figures.add(time.monotonic() - began, 0.0, True)
                return

    async def _forward(
        self,
        scope: dict,
        receive: Any,
        send: Any,
        route: Route,
        replica: Replica,
        path: str,
        retryable: bool,
        began: float,
    ) -> str:
        """Send the request to `replica` and its answer back. "retry" when the replica
        could not be reached and nothing was sent back yet; else "done"."""
        assert self._upstream is not None
        query = scope.get("query_string", b"").decode("latin-1")
        url = f"http://{replica.base}{quote(path, safe='/%:@!$&()*+,;=-._~')}" + (
            f"?{query}" if query else ""
        )
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in self._upstream_headers(scope, route)
        ]
        upload = _Upload(route.max_body_bytes)
        body = None if retryable else _body(receive, upload)
        started = False
        finished = False
        ttfb = 0.0
        error = False
        try:
            response = await self._upstream.request(
                scope["method"],
                yarl.URL(url, encoded=True),
                headers=CIMultiDict(headers),
                data=body,
                allow_redirects=False,
                auto_decompress=False,
            )
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
            # refused, or reset before any answer: out for a while; a request without a
            # body goes to another replica (a slow answer is never a reason)
            replica.ejected_until = time.monotonic() + EJECT_S
            log.info("replica %s of %s failed: %s", replica.task_id, route.name, exc)
            if retryable:
                return "retry"
            return await self._fail(send, route, began, 502, "its replica failed to answer")
        except (aiohttp.ClientError, TimeoutError, _TooLarge, _Gone) as exc:
            if upload.too_large:  # aiohttp wraps what the body raised: ask the body
                return await self._fail(
                    send, route, began, 413, f"bodies up to {route.max_body_bytes} bytes"
                )
            return await self._fail(
                send, route, began, 502, f"its replica failed: {type(exc).__name__}"
            )
        try:
            out = [
                (k, v)
                for k, v in response.raw_headers
                if k.lower().decode("latin-1") not in HOP_BY_HOP
            ]
            out.append((b"x-accel-buffering", b"no"))
            if route.sticky:
                cookie = f"{STICKY_COOKIE}_{route.name}={replica.task_id}; Path=/; HttpOnly"
                out.append((b"set-cookie", cookie.encode()))
                out.append((STICKY_HEADER, replica.task_id.encode()))
            await send({"type": "http.response.start", "status": response.status, "headers": out})
            started = True
            ttfb = time.monotonic() - began
            error = response.status >= 500
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            finished = True
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:  # reset mid-answer, client gone
            error = True
            log.info("stream of %s via %s ended early: %s", route.name, replica.task_id, exc)
            if not started:
                with contextlib.suppress(Exception):
                    await _plain(send, 502, f"service {route.name}: its replica failed")
        finally:
            if finished:
                response.release()  # the connection back to the pool
            else:
                response.close()  # cut: the replica sees its caller leave
            route.figures.add(time.monotonic() - began, ttfb, error)
        return "done"

    @staticmethod
    async def _fail(send: Any, route: Route, began: float, status: int, why: str) -> str:
        await _plain(send, status, f"service {route.name}: {why}")
        route.figures.add(time.monotonic() - began, 0.0, True)
        return "done"

    # -- WebSocket ---------------------------------------------------------------------

    async def _websocket(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            route, path = self._route_for(scope)
            self._admit(route)
        except Refused as refused:
            await send(
                {
                    "type": "websocket.close",
                    "code": 4000 + refused.status,
                    "reason": refused.message[:120],
                }
            )
            return
        replica = route.pick(time.monotonic(), None, set())
        if replica is None:
            await send({"type": "websocket.close", "code": 1013, "reason": "no ready replica"})
            return
        query = scope.get("query_string", b"").decode("latin-1")
        url = f"ws://{replica.base}{path}" + (f"?{query}" if query else "")
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in self._upstream_headers(scope, route)
            if not k.decode("latin-1").lower().startswith("sec-websocket-")
        ]
        replica.in_flight += 1
        began = time.monotonic()
        try:
            try:
                upstream = await websockets.connect(
                    url,
                    additional_headers=headers,
                    subprotocols=scope.get("subprotocols") or None,
                    max_size=None,
                    open_timeout=10,
                )
            except (OSError, websockets.WebSocketException) as exc:
                replica.ejected_until = time.monotonic() + EJECT_S
                await send(
                    {
                        "type": "websocket.close",
                        "code": 1011,
                        "reason": f"replica: {type(exc).__name__}",
                    }
                )
                return
            await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
            await _pump_websocket(receive, send, upstream)
        finally:
            replica.in_flight -= 1
            route.figures.add(time.monotonic() - began, 0.0, False)

    def _upstream_headers(self, scope: dict, route: Route) -> list[tuple[bytes, bytes]]:
        """The caller's headers for the upstream: hop-by-hop ones dropped, no provider
        token passed on, who called said by the router. Of the headers that name the
        caller, only a trusted proxy's X-Forwarded-For/-Proto/-Host and X-Real-IP are
        believed (nginx in front sets them); anyone else could claim any address."""
        peer = str((scope.get("client") or ("", 0))[0])
        trusted = peer in self.trusted_proxies
        forwarded = {b"x-forwarded-for": peer.encode(), b"x-real-ip": peer.encode()} if peer else {}
        forwarded |= {b"x-forwarded-proto": scope.get("scheme", "http").encode()}
        out = []
        for key, value in scope.get("headers", []):
            if key == b"host":
                forwarded.setdefault(b"x-forwarded-host", value)
            if key in CLIENT_IDENTITY or key.startswith(b"x-forwarded"):
                if trusted and key == b"x-forwarded-for":  # its chain, then the proxy
                    forwarded[key] = b", ".join(x for x in (value, forwarded.get(key)) if x)
                elif trusted and key in FROM_PROXY:  # the proxy's view of the caller
                    forwarded[key] = value
                continue
            if key.decode("latin-1") in HOP_BY_HOP:
                continue
            if key == b"authorization":
                if route.auth == "token" or self._authorization_leaks(value):
                    continue
            elif b"gpp_" in value and self._carries_provider_token(value):
                continue
            if key == b"cookie" and route.sticky:
                kept = [
                    c for c in value.split(b"; ") if not c.startswith(f"{STICKY_COOKIE}_".encode())
                ]
                if not kept:
                    continue
                value = b"; ".join(kept)
            out.append((key, value))
        return out + list(forwarded.items())

    def _is_provider_token(self, candidate: bytes) -> bool:
        return hashlib.sha256(candidate).hexdigest() in self.every_token_hash

    @staticmethod
    def _carries_provider_token(value: bytes) -> bool:
        """Whether a header value holds anything shaped like a provider token."""
        return PROVIDER_TOKEN.search(value) is not None

    def _authorization_leaks(self, value: bytes) -> bool:
        """Whether a public service's replica must not see this Authorization: a
        provider token in any spelling (`Bearer<TAB>t`, `Token t`, `token=t`, a bare
        `t`, inside Basic credentials, quoted...), or more words than any scheme needs
        (then no one checks them all)."""
        if PROVIDER_TOKEN.search(value):
            return True
        words = TOKEN_WORD.findall(value)
        if len(words) > MAX_AUTHORIZATION_WORDS:
            return True
        candidates = set(words)
        for word in words:
            for part in word.split(b"="):  # token=<t>, a padded base64 one
                candidates.add(part)
            with contextlib.suppress(binascii.Error, ValueError):  # Basic user:password
                decoded = base64.b64decode(word + b"=" * (-len(word) % 4), validate=False)
                if PROVIDER_TOKEN.search(decoded):
                    return True
                candidates.update(decoded.split(b":"))
        # a token of this provider's that the route table knows, without its shape
        return any(self._is_provider_token(c) for c in candidates if c)

    # -- background work ---------------------------------------------------------------

    async def _refresh_forever(self) -> None:
        said = ""
        while True:
            try:
                await self.refresh()
                said = ""
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                why = f"{type(exc).__name__}: {exc}"
                if why != said:
                    log.warning(
                        "cannot fetch routes from %s: %s; serving the last ones",
                        self.daemon_url,
                        why,
                    )
                    said = why
            await asyncio.sleep(self.refresh_s)

    async def refresh(self) -> None:
        assert self._daemon is not None
        answer = await self._daemon.get("/gateway/routes")
        answer.raise_for_status()
        table = answer.json()
        routes: dict[str, Route] = {}
        for item in table["services"]:
            known = self.routes.get(item["name"])
            route = Route(
                item["name"],
                item["tenant"],
                item["auth"],
                item["sticky"],
                item["max_body_bytes"],
                item["rate_per_s"],
                item["readiness"],
            )
            if known is not None:
                route.figures, route.tokens, route.filled_at = (
                    known.figures,
                    known.tokens,
                    known.filled_at,
                )
            for raw in item["replicas"]:
                old = known.replicas.get(raw["task_id"]) if known else None
                if old is None or (old.address, old.port) != (raw["address"], raw["port"]):
                    old = Replica(raw["task_id"], raw["address"], raw["port"])
                old.draining = raw.get("draining", False)
                route.replicas[old.task_id] = old
            routes[route.name] = route
        new = [(route, r) for route in routes.values() for r in route.replicas.values()]
        self.routes, self.token_hashes = routes, table["token_hashes"]
        self.every_token_hash = frozenset(
            h for hashes in self.token_hashes.values() for h in hashes
        )
        # a replica seen for the first time is probed now: routable within this refresh
        await asyncio.gather(*(self._probe(route, r) for route, r in new if r.probed_at == 0))

    async def _probe_forever(self) -> None:
        while True:
            now = time.monotonic()
            due = [
                (route, replica)
                for route in list(self.routes.values())
                for replica in list(route.replicas.values())
                if now - replica.probed_at >= route.readiness.get("period_s", 2.0)
            ]
            if due:
                await asyncio.gather(*(self._probe(route, replica) for route, replica in due))
            await asyncio.sleep(0.1)

    async def _probe(self, route: Route, replica: Replica) -> None:
        replica.probed_at = time.monotonic()
        timeout = route.readiness.get("timeout_s", 2.0)
        path = route.readiness.get("path")
        try:
            if path:
                assert self._upstream is not None
                async with self._upstream.get(
                    f"http://{replica.base}{path}", timeout=aiohttp.ClientTimeout(total=timeout)
                ) as answer:
                    ready = answer.status < 400
            else:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(replica.address, replica.port), timeout
                )
                writer.close()
                ready = True
        except (TimeoutError, OSError, aiohttp.ClientError):
            ready = False
        if ready and not replica.ready:
            replica.ejected_until = 0.0
        replica.ready = ready

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(httpx.HTTPError):
                await self.report()

    async def report(self) -> None:
        assert self._daemon is not None
        reports = []
        for route in list(self.routes.values()):
            reports.append(
                {
                    "name": route.name,
                    "in_flight": sum(r.in_flight for r in route.replicas.values()),
                    "replicas": {
                        r.task_id: {"ready": r.ready and not r.draining, "in_flight": r.in_flight}
                        for r in route.replicas.values()
                    },
                    **route.figures.summary(),
                    "router_started": self.started,
                }
            )
        await self._daemon.post("/gateway/stats", json={"services": reports})


class _TooLarge(Exception):
    pass


class _Gone(Exception):
    pass


@dataclass
class _Upload:
    limit: int
    too_large: bool = False  # what the body raised, whatever aiohttp wraps it in


def bearer_token(authorization: bytes) -> str | None:
    """The token of `Authorization: Bearer <token>` (any case, spaces or tabs): the one
    spelling the router accepts."""
    found = BEARER.match(authorization.decode("latin-1"))
    return found.group(1) if found else None


async def _body(receive: Any, upload: _Upload):
    """The request body as it arrives, refused past its limit; a caller who leaves
    mid-body ends the upstream request too (a cut body never goes up as a whole one)."""
    seen = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Gone()
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > upload.limit:
            upload.too_large = True
            raise _TooLarge()
        if chunk:
            yield chunk
        if not message.get("more_body"):
            return


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for key, value in headers:
        if key == b"content-length":
            with contextlib.suppress(ValueError):
                return int(value)
    return None


def _chunked(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(k == b"transfer-encoding" for k, _ in headers)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _cookie(headers: list[tuple[bytes, bytes]], name: str) -> str | None:
    for key, value in headers:
        if key == b"cookie":
            for part in value.decode("latin-1").split(";"):
                k, _, v = part.strip().partition("=")
                if k == name:
                    return v
    return None


async def _plain(
    send: Any, status: int, message: str, headers: dict[str, str] | None = None
) -> None:
    body = (message + "\n").encode()
    out = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
    ]
    out += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})


async def _pump_websocket(receive: Any, send: Any, upstream: Any) -> None:
    """Frames both ways until either side closes."""

    async def client_to_upstream() -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                await upstream.close()
                return
            if message.get("text") is not None:
                await upstream.send(message["text"])
            elif message.get("bytes") is not None:
                await upstream.send(message["bytes"])

    async def upstream_to_client() -> None:
        try:
            async for frame in upstream:
                if isinstance(frame, str):
                    await send({"type": "websocket.send", "text": frame})
                else:
                    await send({"type": "websocket.send", "bytes": frame})
            code = upstream.close_code or 1000
        except websockets.ConnectionClosed as closed:
            code = closed.code or 1000
        with contextlib.suppress(Exception):
            await send({"type": "websocket.close", "code": code})

    tasks = [asyncio.create_task(client_to_upstream()), asyncio.create_task(upstream_to_client())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await upstream.close()
