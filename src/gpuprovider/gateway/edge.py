"""The router's edge: what a caller may hold of it before a request reaches the proxy.

uvicorn with httptools parses requests fast but bounds nothing a hostile caller controls:
no limit on the size or number of headers (a 1 MiB header reaches the application), no
timeout before the first request or while a request head trickles in (a slow connection
is held for ever), no limit on connections per caller or in total (`limit_concurrency`
answers 503 only after reading a whole head, and counts every caller together). So the
router runs a protocol of its own: uvicorn's httptools protocol with these guards, which
work on bytes as they arrive, before the application sees a request.

- **Request heads**: at most `max_header_bytes` (request line and headers) and
  `max_headers` headers: 414 or 431 and the connection closed, counted on the bytes as
  they come, so a caller cannot make the router buffer more than that plus one read.
- **Timeouts**: a connection must deliver a whole request head `header_timeout_s` after
  it opened or after the head's first byte (a slowloris is closed, 408); between requests
  a connection may idle `keepalive_timeout_s`; a request body may pause `body_timeout_s`
  between two reads (never while the router itself is not reading: backpressure). Each
  connection's timeouts are up to 10 % longer, its own share, so that a flood's
  connections time out spread out, not all in one pass of the event loop.
- **Connections**: at most `max_connections_per_client` per caller address (an IPv6
  caller per /64; not for trusted proxies, whose callers they limit themselves: 429 and
  closed) and `max_connections` in total, which also fits the open-file limit. When all
  are taken, the connection waiting longest for a request head (idle or slow) is closed
  to make room; only when every connection is busy with a request is the newcomer
  refused (503). Slow callers lose their connections, real ones keep being served.
- **A caller that goes away** (its connection lost or timed out) has its request
  cancelled at once: the application registers its task in the scope's
  `gpuprovider.edge` extension, and the protocol cancels it, which releases its replica's
  in-flight slot and closes the upstream connection (the replica sees the caller leave).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import resource
import socket
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol
from uvicorn.server import ServerState

log = logging.getLogger(__name__)

EDGE_EXTENSION = "gpuprovider.edge"  # the key of a request's Call in scope["extensions"]
FILES_PER_CONNECTION = 2  # a proxied request holds the caller's socket and a replica's
FILES_RESERVED = 64  # listening socket, logs, the daemon client, probes
SUMMARY_EVERY_S = 60.0  # what the edge refused is logged at most this often, in sums
# After refusing a request that is still arriving, the rest is read and dropped this
# long (and this much) before closing: closing with unread bytes resets the connection,
# and the caller would never read why (nginx's lingering close)
LINGER_S = 2.0
TIMEOUT_SPREAD = 0.1
LINGER_BYTES = 8 << 20


@dataclass(frozen=True)
class EdgeLimits:
    max_header_bytes: int = 32768
    max_headers: int = 100
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 75.0
    body_timeout_s: float = 60.0
    max_connections: int = 4096
    max_connections_per_client: int = 256
    trusted_proxies: frozenset[str] = frozenset({"127.0.0.1", "::1"})


class Call:
    """One request's link between the protocol and the application: the application
    puts its task here; the protocol cancels it when the caller goes away."""

    __slots__ = ("gone", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task | None = None
        self.gone = False

    def abandon(self) -> None:
        self.gone = True
        if self.task is not None and not self.task.done():
            self.task.cancel()


def call_of(scope: dict) -> Call | None:
    return (scope.get("extensions") or {}).get(EDGE_EXTENSION)


class Outcome(enum.Enum):
    """What the edge did to a connection, summed for the log."""

    REFUSED_PER_CLIENT = "refused: too many from one client"
    REFUSED_FULL = "refused: every connection busy"
    EVICTED = "closed to make room (waiting longest for a request)"
    HEAD_TIMEOUT = "closed: request head not complete in time"
    BODY_TIMEOUT = "closed: request body paused too long"
    HEAD_TOO_LARGE = "refused: request head too large"
    CALLER_GONE = "requests cancelled: caller went away"


def open_file_limit() -> tuple[int, int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit where it can:
    (soft before, soft now, hard). Each connection the router holds is a file."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard
    if hard == resource.RLIM_INFINITY:  # the kernel's own ceiling is the real one
        try:
            wanted = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            wanted = 1 << 20
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, wanted, exc)
    now, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, now, hard


def client_key(address: str) -> str:
    """Whose connection this is, for the per-client limit: the address, an IPv6 one by
    its /64 (one subscriber's network), an IPv4-mapped one as IPv4."""
    if ":" not in address:
        return address
    try:
        packed = socket.inet_pton(socket.AF_INET6, address.split("%", 1)[0])
    except OSError:
        return address
    if packed[:12] == V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"


V4_MAPPED = bytes(10) + b"\xff\xff"


@dataclass
class Edge:
    """The connections of one router process, and the limits they live under."""

    limits: EdgeLimits
    max_connections: int  # what the open-file limit allows of limits.max_connections
    by_client: Counter[str] = field(default_factory=Counter)
    total: int = 0
    # connections waiting for a request head (idle or slow), longest-waiting first: the
    # ones closed to make room
    waiting: OrderedDict[EdgeHttpProtocol, None] = field(default_factory=OrderedDict)
    outcomes: Counter[Outcome] = field(default_factory=Counter)
    summarised_at: float = field(default_factory=time.monotonic)

    @property
    def tick_s(self) -> float:
        """How often a waiting connection checks its deadline: the shortest timeout."""
        lim = self.limits
        return min(lim.header_timeout_s, lim.keepalive_timeout_s, lim.body_timeout_s)

    @classmethod
    def for_process(cls, limits: EdgeLimits) -> Edge:
        """The edge sized for this process: the open-file limit raised first, the
        connection limit cut to what it allows, both logged."""
        before, soft, hard = open_file_limit()
        fits = max(16, (soft - FILES_RESERVED) // FILES_PER_CONNECTION)
        edge = cls(limits, min(limits.max_connections, fits))
        raised = f"raised from {before} " if soft > before else ""
        log.info(
            "open files: soft limit %d %s(hard %s); connections: %d in total%s, %d per "
            "client; request heads up to %d bytes and %d headers within %gs; keep-alive "
            "%gs; body pauses up to %gs",
            soft,
            raised,
            "unlimited" if hard == resource.RLIM_INFINITY else hard,
            edge.max_connections,
            f" ({limits.max_connections} asked: the open-file limit allows {fits})"
            if fits < limits.max_connections
            else "",
            limits.max_connections_per_client,
            limits.max_header_bytes,
            limits.max_headers,
            limits.header_timeout_s,
            limits.keepalive_timeout_s,
            limits.body_timeout_s,
        )
        return edge

    def admit(self, protocol: EdgeHttpProtocol) -> tuple[int, str] | None:
        """Count a new connection in, or say why not (status, message)."""
        key = protocol.client_key
        if not protocol.trusted and self.by_client[key] >= self.limits.max_connections_per_client:
            self.note(Outcome.REFUSED_PER_CLIENT)
            return 429, (
                f"too many connections from {key}: at most "
                f"{self.limits.max_connections_per_client} at once"
            )
        if self.total >= self.max_connections:
            if not self.waiting:
                self.note(Outcome.REFUSED_FULL)
                return 503, "the gateway is at its connection limit; try again shortly"
            oldest, _ = self.waiting.popitem(last=False)
            self.note(Outcome.EVICTED)
            oldest.close_waiting()
            self.release(oldest)  # its slot is this one's now, before the loop says so
        self.by_client[key] += 1
        self.total += 1
        protocol.counted = True
        return None

    def release(self, protocol: EdgeHttpProtocol) -> None:
        self.waiting.pop(protocol, None)
        if not protocol.counted:
            return
        protocol.counted = False
        self.total -= 1
        key = protocol.client_key
        self.by_client[key] -= 1
        if self.by_client[key] <= 0:
            del self.by_client[key]

    def note(self, outcome: Outcome) -> None:
        """Count what happened; log the sums at most every SUMMARY_EVERY_S (under a
        flood, a line per connection would be the attack's amplifier)."""
        self.outcomes[outcome] += 1
        now = time.monotonic()
        if now - self.summarised_at >= SUMMARY_EVERY_S:
            self.summarise(now)

    def summarise(self, now: float | None = None) -> None:
        if self.outcomes:
            sums = ", ".join(f"{o.value}: {n}" for o, n in self.outcomes.items())
            log.warning(
                "edge, last %.0fs: %s; %d connections open", SUMMARY_EVERY_S, sums, self.total
            )
            self.outcomes.clear()
        self.summarised_at = now if now is not None else time.monotonic()


class _Limit(Exception):
    """Raised in a parser callback to stop parsing; the refusal is on the protocol."""


class Phase(enum.Enum):
    WAITING = "waiting for a request head"  # new, idle between requests, or head arriving
    BODY = "reading a request body"
    BUSY = "request read, answering"


class Wait(enum.Enum):
    """What a connection is given time for, and so which timeout applies."""

    HEAD = "header_timeout_s"  # a request head, from the connection's opening or first byte
    IDLE = "keepalive_timeout_s"  # the next request, after an answer
    BODY = "body_timeout_s"  # the next piece of a request body


class EdgeHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the edge's limits (see the module's doc).

    Time limits need no timer per request: each connection has one timer that fires at
    most every `Edge.tick_s` while the connection waits for something, and checks the
    deadline of what it waits for (`wait`, `since`); a request only writes those two."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        edge: Edge,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.edge = edge
        self.counted = False
        self.client_key = ""
        self.trusted = False
        self.phase = Phase.WAITING
        self.head_bytes = 0  # of the head arriving, as raw bytes
        self.head_uncounted = False  # part of this head came in bytes not counted
        self.refusal: tuple[int, str] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.wait: Wait | None = None
        self.since = 0.0
        self.calls: list[tuple[Any, Call]] = []  # (cycle, call) of requests not answered
        self.lingering = -1  # bytes dropped after a refusal; -1: not refused
        self.refused = False  # at connection: never set up, nothing to tear down
        # each connection's timeouts are up to 10 % longer, its own share: connections
        # opened together (a flood) time out spread over a while, not in one loop pass
        # that would stall every other caller, and do not all come back at once
        self.stretch = 1.0 + random.random() * TIMEOUT_SPREAD

    # -- connection ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # admitted or refused before uvicorn sets the connection up: a flood of refused
        # connections costs as little as it can
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple | list) and peer else ""
        self.client_key = client_key(address)
        trusted = self.edge.limits.trusted_proxies
        self.trusted = address in trusted or self.client_key in trusted
        refused = self.edge.admit(self)
        if refused is not None:
            self.transport, self.refused = transport, True
            self._answer(*refused, extra=b"retry-after: 1\r\n")
            return
        super().connection_made(transport)
        self.edge.waiting[self] = None
        self._wait(Wait.HEAD)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:  # uvicorn never knew it
            return
        self._stop_timer()
        self.edge.release(self)
        for cycle, call in self.calls:
            if not cycle.response_complete and not call.gone:
                self.edge.note(Outcome.CALLER_GONE)
                call.abandon()
        self.calls.clear()
        super().connection_lost(exc)

    def close_waiting(self) -> None:
        """Closed to make room: it was waiting for a request head."""
        self._stop_timer()
        if not self.transport.is_closing():
            self.transport.close()

    # -- bytes in ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.lingering >= 0:  # refused: what still comes is dropped, unparsed
            self.lingering += len(data)
            if self.lingering > LINGER_BYTES:
                self.transport.close()
            return
        if self.phase is Phase.WAITING:
            self.head_bytes += len(data)
        elif self.phase is Phase.BODY:
            self.since = self.loop.time()  # the body's pause starts over
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if self.refusal is not None:
                self.edge.note(Outcome.HEAD_TOO_LARGE)
                self._answer(*self.refusal, linger=True)
            else:
                self.logger.warning("Invalid HTTP request received.")
                self._stop_timer()
                self.send_400_response("Invalid HTTP request received.")
            return
        if self.phase is Phase.WAITING and self.head_bytes > self.edge.limits.max_header_bytes:
            # a head still arriving, past the limit already: never buffer more of it
            self.edge.note(Outcome.HEAD_TOO_LARGE)
            self._answer(431, self._too_large_head(), linger=True)

    # -- parser callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        extensions: dict[str, Any] = {EDGE_EXTENSION: Call()}
        self.scope["extensions"] = extensions  # type: ignore[typeddict-item]
        self.head_uncounted = self.phase is not Phase.WAITING
        self.phase = Phase.WAITING
        if self.wait is not Wait.HEAD:  # a fresh connection's deadline runs from its opening
            self._wait(Wait.HEAD)

    def on_headers_complete(self) -> None:
        # The URL and headers are checked once whole (no callback per header: the raw
        # count already bounds what a head can hold); the exact size only where the raw
        # count cannot tell (most heads: it can).
        limits = self.edge.limits
        if len(self.headers) > limits.max_headers:
            self.refusal = 431, f"more than {limits.max_headers} headers"
            raise _Limit
        if len(self.url) > limits.max_header_bytes:
            self.refusal = 414, f"the URL is over {limits.max_header_bytes} bytes"
            raise _Limit
        if (self.head_uncounted or self.head_bytes > limits.max_header_bytes) and len(
            self.url
        ) + sum(len(k) + len(v) + 4 for k, v in self.headers) > limits.max_header_bytes:
            self.refusal = 431, self._too_large_head()
            raise _Limit
        self.edge.waiting.pop(self, None)
        self.phase = Phase.BODY
        self.head_bytes = 0
        self._wait(Wait.BODY)
        call = call_of(self.scope)  # type: ignore[arg-type]
        super().on_headers_complete()
        if call is not None and self.cycle is not None and self.cycle.scope is self.scope:
            if self.calls:
                self.calls = [(c, k) for c, k in self.calls if not c.response_complete]
            self.calls.append((self.cycle, call))

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.phase = Phase.BUSY
        self.wait = None
        if self.cycle is not None and self.cycle.response_complete:
            self._idle()  # answered before its body ended (a 413, say)

    def on_response_complete(self) -> None:
        if self.pipeline or self.transport.is_closing():
            super().on_response_complete()  # uvicorn starts the next pipelined request
            return
        # uvicorn's own, less its keep-alive timer: this protocol times idle connections
        self.server_state.total_requests += 1
        self.flow.resume_reading()
        if self.phase is Phase.BUSY and self.cycle is not None and self.cycle.response_complete:
            self._idle()

    def _idle(self) -> None:
        """Between requests: waiting (so closed first to make room), keepalive_timeout_s."""
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()  # uvicorn's, where it armed one
        self.phase = Phase.WAITING
        self.head_bytes = 0
        self.edge.waiting[self] = None
        self._wait(Wait.IDLE)

    def handle_websocket_upgrade(self) -> None:
        """The connection becomes a WebSocket: off the waiting list, no timers; it stays
        counted until it closes (EdgeWebSocketProtocol releases it)."""
        self._stop_timer()
        self.edge.waiting.pop(self, None)
        self.phase = Phase.BUSY
        super().handle_websocket_upgrade()
        upgraded = self.transport.get_protocol()
        if isinstance(upgraded, EdgeWebSocketProtocol):
            upgraded.held_by = self
        else:  # not ours: nothing would release the slot later, so release it now
            self.edge.release(self)

    # -- time ----------------------------------------------------------------------------

    def _wait(self, wait: Wait) -> None:
        self.wait, self.since = wait, self.loop.time()
        if self.timer is None:
            self.timer = self.loop.call_later(self.edge.tick_s, self._tick)

    def _stop_timer(self) -> None:
        self.wait = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _tick(self) -> None:
        """Whether what the connection waits for is overdue. Fires at most tick_s apart
        (the shortest timeout), so a deadline set meanwhile is never missed."""
        self.timer = None
        wait = self.wait
        if wait is None or self.transport.is_closing():
            return  # busy answering: the next wait starts the timer again
        timeout = getattr(self.edge.limits, wait.value) * self.stretch
        left = self.since + timeout - self.loop.time()
        if left > 0 or (wait is Wait.BODY and self.flow.read_paused):
            # not yet; or the router itself is not reading the body (backpressure)
            self.timer = self.loop.call_later(
                max(0.01, min(left, self.edge.tick_s)) if left > 0 else self.edge.tick_s,
                self._tick,
            )
            return
        self.wait = None
        if wait is Wait.IDLE:
            self.transport.close()
        elif wait is Wait.HEAD:
            self.edge.note(Outcome.HEAD_TIMEOUT)
            if self.head_bytes:
                self._answer(408, "the request head did not arrive in time")
            else:
                self.transport.close()
        else:
            self.edge.note(Outcome.BODY_TIMEOUT)
            for _, call in self.calls:
                call.abandon()
            cycle = self.cycle
            if cycle is not None and not cycle.response_started:
                cycle.disconnected = True  # the application's answer goes nowhere now
                self._answer(408, "the request body paused too long")
            else:
                self.transport.close()

    # -- answers -------------------------------------------------------------------------

    def _too_large_head(self) -> str:
        return f"the request head is over {self.edge.limits.max_header_bytes} bytes"

    def _answer(self, status: int, message: str, extra: bytes = b"", linger: bool = False) -> None:
        """A plain answer written straight to the socket, then the connection closed;
        never in the middle of another answer on this connection. `linger`: the caller
        is still sending; read and drop what comes a while, so that it reads the answer."""
        self._stop_timer()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete or self.cycle.disconnected:
            body = message.encode() + b"\n"
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: %d\r\nconnection: close\r\n%s\r\n%s"
                % (status, HTTP_REASONS.get(status, b""), len(body), extra, body)
            )
            if linger and self.transport.can_write_eof():
                self.transport.write_eof()  # the answer, then our end closed
                self.lingering = 0
                self.edge.waiting.pop(self, None)
                self.timer = self.loop.call_later(LINGER_S, self.transport.close)
                self.flow.resume_reading()
                return
        self.transport.close()


HTTP_REASONS = {
    408: b"Request Timeout",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


class EdgeWebSocketProtocol(AutoWebSocketsProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's WebSocket protocol, releasing the connection's slot when it closes."""

    held_by: EdgeHttpProtocol | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            if self.held_by is not None:
                self.held_by.edge.release(self.held_by)
                self.held_by = None
