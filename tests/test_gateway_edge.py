"""The gateway's edge, attacked: the real router process (`gpuprovider gateway`, as `up`
starts it) in front of a replica that records what reaches it, with a stand-in daemon
serving its routes and taking its figures (no store, no tasks: only the router is under
test). Callers at other addresses are 127.0.0.2 and up (all of 127/8 is this machine)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psutil
import pytest

from gpuprovider.gateway.edge import client_key
from gpuprovider.testing import free_port, make_home, wait_for

pytestmark = pytest.mark.slow

ADMIN = "gpp_" + "A" * 43  # shaped like identity/keys.py's tokens
TENANT = "gpp_" + "t" * 42 + "0"
APP_OWN = "Bearer app-own-key-0123456789abcdef"  # a public service's own scheme


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Seen:
    method: str
    path: str
    headers: list[tuple[str, str]]

    def get(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class Replica:
    """A raw HTTP/1.1 server: records each request; `/hang` never answers and notes
    when its caller (the router) closes the connection."""

    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    hanging: threading.Event = field(default_factory=threading.Event)
    hang_closed: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the router may cut it (what some tests do)
            self._exchange(conn)

    def _exchange(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = [tuple(h.split(": ", 1)) for h in lines[1:]]
                seen = Seen(method, path, headers)  # type: ignore[arg-type]
                length = int((seen.get("content-length") or ["0"])[0])
                chunked = "chunked" in (seen.get("transfer-encoding") or [""])[0]
                while (chunked and b"0\r\n\r\n" not in buf) or len(buf) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                buf = buf[length:] if not chunked else buf.split(b"0\r\n\r\n", 1)[1]
                self.seen.append(seen)
                if path.endswith("/hang"):
                    self.hanging.set()
                    while conn.recv(65536):
                        pass
                    self.hang_closed.set()
                    return
                body = json.dumps({"path": path, "headers": headers}).encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )

    def saw(self, marker: str) -> list[Seen]:
        return [s for s in self.seen if marker in s.path]


class StandinDaemon:
    """The two routes the router uses: its route table, and its figures."""

    def __init__(self, replica: Replica):
        self.stats: dict[str, dict] = {}
        table = {
            "services": [
                _service("pub", "public", replica.port, max_body_bytes=10),
                _service("priv", "token", replica.port),
            ],
            "token_hashes": {"t": [sha(TENANT)], "*": [sha(ADMIN)]},
        }
        daemon = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps(table).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["content-length"]))
                for item in json.loads(raw)["services"]:
                    daemon.stats[item["name"]] = item
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def in_flight(self, name: str) -> int | None:
        return (self.stats.get(name) or {}).get("in_flight")


def _service(name: str, auth: str, port: int, max_body_bytes: int = 1 << 20) -> dict:
    return {
        "name": name,
        "tenant": "t",
        "auth": auth,
        "sticky": False,
        "max_body_bytes": max_body_bytes,
        "rate_per_s": None,
        "readiness": {"period_s": 0.5},
        "replicas": [{"task_id": f"t-{name}", "address": "127.0.0.1", "port": port}],
    }


@dataclass
class Router:
    proc: subprocess.Popen
    url: str
    port: int
    log: Path
    replica: Replica
    daemon: StandinDaemon

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def start_router(root: Path, nofile: tuple[int, int] | None = None, **gateway: object) -> Router:
    """`gpuprovider gateway` on a home whose [api] is the stand-in daemon, with
    [gateway] settings overridden, under an open-file limit if given."""
    replica = Replica()
    replica.start()
    daemon = StandinDaemon(replica)
    port = free_port()
    home = make_home(root / "home", daemon.port, gateway_port=port)
    (home.root / "gateway.token").write_text("gpp_router")
    text = home.config.read_text()
    for key, value in gateway.items():
        text, count = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert count == 1, f"[gateway] {key} not in the default config"
    home.config.write_text(text)
    log = root / "gateway.log"

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpuprovider", "--home", str(home.root), "gateway"],
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=limit,
        )
    router = Router(proc, f"http://127.0.0.1:{port}", port, log, replica, daemon)

    def serving() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(router.url + "/s/pub/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(serving, 30, "the router to route to its replica")
    return router


@pytest.fixture(scope="module")
def edge(tmp_path_factory) -> Iterator[Router]:
    router = start_router(
        tmp_path_factory.mktemp("edge"),
        header_timeout_s=1.0,
        keepalive_timeout_s=1.0,
        body_timeout_s=1.0,
        max_connections_per_client=5,
    )
    yield router
    router.stop()


def connect(router: Router, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(
        ("127.0.0.1", router.port), timeout=10, source_address=(source, 0)
    )
    return sock


def answer_of(sock: socket.socket) -> bytes:
    """All the router sends until it closes (b"" if it closed without a word)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def one_answer(sock: socket.socket) -> bytes:
    """One whole answer with a Content-Length, the connection left open."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What came before the router closed the connection, or None if it is still open
    after `seconds` (no byte sent meanwhile)."""
    sock.settimeout(seconds)
    try:
        return answer_of(sock)
    except TimeoutError:
        return None


# -- request heads ---------------------------------------------------------------------


def test_a_1_mib_header_is_refused_with_431_and_never_forwarded(edge):
    sock = connect(edge)
    head = b"GET /s/pub/huge HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(head)  # refused while still sending: the answer is still there to read
    answer = answer_of(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"over 32768 bytes" in answer
    too_many = b"".join(b"X-H%d: v\r\n" % i for i in range(101))
    sock = connect(edge)
    sock.sendall(b"GET /s/pub/many HTTP/1.1\r\nHost: x\r\n" + too_many + b"\r\n")
    answer = answer_of(sock)
    assert answer.startswith(b"HTTP/1.1 431 ") and b"more than 100 headers" in answer
    long_url = b"GET /s/pub/" + b"u" * 40000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    sock = connect(edge)
    sock.sendall(long_url)
    assert answer_of(sock).startswith(b"HTTP/1.1 414 ")
    # a head under the limit still goes through
    fine = httpx.get(edge.url + "/s/pub/fine", headers={"X-Big": "a" * 30000})
    assert fine.status_code == 200
    assert not edge.replica.saw("/huge") and not edge.replica.saw("/many")


def test_many_large_headers_do_not_grow_the_router(edge):
    router = psutil.Process(edge.proc.pid)
    before = router.memory_info().rss

    def send_big(_: int) -> bytes:
        sock = connect(edge)
        head = b"GET /s/pub/big HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * (4 << 20) + b"\r\n\r\n"
        with sock:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(head)
            return answer_of(sock)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send_big, range(16)))
    grown_mib = (router.memory_info().rss - before) / (1 << 20)
    # before the edge: each 4 MiB header was buffered whole and forwarded (~150 MiB)
    assert grown_mib < 16, f"the router grew {grown_mib:.0f} MiB"
    assert all(a.startswith(b"HTTP/1.1 431 ") or a == b"" for a in answers)
    assert not edge.replica.saw("/big")


# -- timeouts ---------------------------------------------------------------------------


def test_a_silent_connection_is_closed_after_the_header_timeout(edge):
    sock = connect(edge)
    assert closed_within(sock, 10) == b""  # header_timeout_s = 1: closed, no answer


def test_a_slowloris_head_is_closed_with_408(edge):
    sock = connect(edge)
    sock.sendall(b"GET /s/pub/slow HTTP/1.1\r\nHost: x\r\n")
    sock.settimeout(0.2)
    answer = b""
    deadline = time.monotonic() + 10
    try:
        for i in range(1000):  # a header line every 0.2 s, never the end of the head
            assert time.monotonic() < deadline, "the slow head was never cut"
            sock.sendall(b"X-Slow-%d: v\r\n" % i)
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            break
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert not edge.replica.saw("/slow")


def test_an_idle_keep_alive_connection_is_closed(edge):
    sock = connect(edge)
    sock.sendall(b"GET /s/pub/once HTTP/1.1\r\nHost: x\r\n\r\n")
    assert one_answer(sock).startswith(b"HTTP/1.1 200 ")
    assert closed_within(sock, 10) == b""  # keepalive_timeout_s = 1 (uvicorn's was 75 s)


def test_a_body_that_stops_coming_is_cut_and_frees_its_replica(edge):
    sock = connect(edge)
    sock.sendall(
        b"POST /s/priv/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + ADMIN.encode()
        + b"\r\nContent-Length: 100\r\n\r\n0123456789"
    )
    answer = closed_within(sock, 10)
    assert answer is not None and answer.startswith(b"HTTP/1.1 408 "), answer
    wait_for(lambda: edge.daemon.in_flight("priv") == 0, 10, "the slot freed")


# -- connections --------------------------------------------------------------------------


def test_connections_per_client_are_bounded_but_not_for_a_trusted_proxy(edge):
    held = [connect(edge, "127.0.0.2") for _ in range(5)]
    try:
        wait_for(lambda: _router_connections(edge) >= 5, 10, "five held connections")
        sixth = connect(edge, "127.0.0.2")
        answer = closed_within(sixth, 10)
        assert answer is not None and answer.startswith(b"HTTP/1.1 429 "), answer
        assert b"at most 5 at once" in answer and b"retry-after: 1" in answer
        other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.3"))
        assert other.get(edge.url + "/s/pub/other").status_code == 200  # its own count
        proxy = [connect(edge, "127.0.0.1") for _ in range(8)]  # nginx in front: unbounded
        for sock in proxy:
            sock.sendall(b"GET /s/pub/proxied HTTP/1.1\r\nHost: x\r\n\r\n")
            assert one_answer(sock).startswith(b"HTTP/1.1 200 ")
            sock.close()
    finally:
        for sock in held:
            sock.close()


def _router_connections(router: Router, client: str | None = None) -> int:
    return sum(
        1
        for c in psutil.Process(router.proc.pid).net_connections("tcp")
        if c.laddr
        and c.laddr.port == router.port
        and c.status == psutil.CONN_ESTABLISHED
        and (client is None or (c.raddr and c.raddr.ip == client))
    )


def test_real_clients_are_served_while_slow_connections_fill_the_router(tmp_path):
    """With 256 files (which the router cannot raise), 300 slow connections from twenty
    addresses: today's router ran out of files and stopped answering. Now it holds what
    its files allow, closes the longest-waiting slow one for each newcomer, and every
    real request is answered."""
    router = start_router(
        tmp_path, nofile=(256, 256), max_connections_per_client=15, header_timeout_s=60.0
    )
    slow: list[socket.socket] = []
    try:
        for i in range(300):
            sock = connect(router, f"127.0.0.{2 + i % 20}")
            sock.sendall(b"GET /s/pub/slow HTTP/1.1\r\n")  # and never the rest
            slow.append(sock)
        with httpx.Client(timeout=10) as client:
            for _ in range(30):
                assert client.get(router.url + "/s/pub/real").status_code == 200
        # what its 256 files allow: each proxied request may need a replica's file too
        assert "connections: 96 in total (4096 asked" in router.log.read_text()
        assert _router_connections(router) <= 96
    finally:
        for sock in slow:
            sock.close()
        router.stop()


def test_the_open_file_limit_is_raised_to_the_hard_limit_and_logged(tmp_path):
    router = start_router(tmp_path, nofile=(256, 4096))
    try:
        limits = Path(f"/proc/{router.proc.pid}/limits").read_text()
        assert re.search(r"Max open files\s+4096\s+4096", limits), limits
        assert "open files: soft limit 4096 raised from 256 (hard 4096)" in router.log.read_text()
    finally:
        router.stop()


# -- callers who leave -------------------------------------------------------------------


def test_a_caller_that_leaves_frees_its_slot_and_cancels_the_upstream_request(edge):
    edge.replica.hanging.clear()
    edge.replica.hang_closed.clear()
    sock = connect(edge)
    sock.sendall(b"GET /s/pub/hang HTTP/1.1\r\nHost: x\r\n\r\n")
    assert edge.replica.hanging.wait(10), "the request never reached the replica"
    wait_for(lambda: edge.daemon.in_flight("pub") == 1, 10, "the request in flight")
    sock.close()
    # before: in flight until read_timeout_s (an hour), the replica still working on it
    assert edge.replica.hang_closed.wait(10), "the upstream request was not cancelled"
    wait_for(lambda: edge.daemon.in_flight("pub") == 0, 10, "the slot freed")


# -- what reaches a replica ---------------------------------------------------------------


def _seen_by_replica(
    router: Router, marker: str, headers: dict[str, str], source: str = "127.0.0.1"
) -> Seen:
    """What the replica saw of a GET with `headers`, sent as raw bytes (any spelling)."""
    sock = connect(router, source)
    lines = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items())
    sock.sendall(b"GET /s/pub/%s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (marker.encode(), lines))
    answer = one_answer(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    return Seen("GET", marker, [tuple(h) for h in body["headers"]])  # type: ignore[misc]


@pytest.mark.parametrize("token", [ADMIN, TENANT], ids=["admin", "tenant"])
@pytest.mark.parametrize(
    "spelling",
    [
        "Bearer {t}",
        "Bearer\t{t}",
        "bearer {t}",
        "BEARER   {t}  ",
        "Token {t}",
        'Token token="{t}"',
        "{t}",
        "Basic {basic}",
        "Bearer {t}, Basic eHl6",
        "Bearer\t\t{t}",
    ],
)
def test_provider_tokens_never_reach_a_public_replica_in_any_spelling(edge, token, spelling):
    basic = base64.b64encode(f"user:{token}".encode()).decode()
    value = spelling.format(t=token, basic=basic)
    seen = _seen_by_replica(edge, "tok", {"Authorization": value, "X-Api-Key": token})
    assert token not in json.dumps(seen.headers)
    assert not seen.get("authorization") and not seen.get("x-api-key")


def test_a_provider_token_unknown_to_the_router_is_dropped_by_its_shape(edge):
    """A metrics or verify token is not in the route table (it may call no service),
    nor is one revoked a moment ago: still never a replica's to see."""
    other = "gpp_" + "m" * 43
    seen = _seen_by_replica(edge, "shape", {"Authorization": f"Token {other}", "X-Key": other})
    assert other not in json.dumps(seen.headers)


def test_a_public_replica_gets_the_callers_own_authorization(edge):
    for own in (APP_OWN, "Basic dXNlcjpwYXNz", "Bearer\tapp-own-key-0123456789abcdef"):
        assert _seen_by_replica(edge, "own", {"Authorization": own}).get("authorization") == [
            own.strip()
        ]
    # more words than any scheme needs: not worth checking, dropped
    many = "Bearer " + ", ".join(f"word-number-{i:06d}" for i in range(40))
    assert _seen_by_replica(edge, "own", {"Authorization": many}).get("authorization") == []


def test_the_router_accepts_its_tokens_with_tabs_and_any_case_and_strips_them(edge):
    for spelling in ("Bearer\t{t}", "bearer  {t}", "BEARER {t} "):
        sock = connect(edge)
        sock.sendall(
            b"GET /s/priv/in HTTP/1.1\r\nHost: x\r\nAuthorization: %s\r\n\r\n"
            % spelling.format(t=TENANT).encode()
        )
        answer = one_answer(sock)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert TENANT.encode() not in answer
    assert httpx.get(edge.url + "/s/priv/in", headers={"Authorization": TENANT}).status_code == 401


SPOOFED = {
    "Forwarded": "for=6.6.6.6;proto=https",
    "X-Real-IP": "6.6.6.6",
    "X-Client-IP": "6.6.6.6",
    "Client-IP": "6.6.6.6",
    "True-Client-IP": "6.6.6.6",
    "CF-Connecting-IP": "6.6.6.6",
    "Fastly-Client-IP": "6.6.6.6",
    "X-Cluster-Client-IP": "6.6.6.6",
    "X-Original-Forwarded-For": "6.6.6.6",
    "X-Forwarded-For": "6.6.6.6",
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Port": "443",
    "X-Forwarded-Prefix": "/admin",
}


def test_a_remote_caller_cannot_say_who_it_is(edge):
    seen = _seen_by_replica(edge, "who", SPOOFED, source="127.0.0.2")
    text = json.dumps(seen.headers)
    assert "6.6.6.6" not in text and "evil.example" not in text and "/admin" not in text
    assert seen.get("x-forwarded-for") == ["127.0.0.2"]
    assert seen.get("x-real-ip") == ["127.0.0.2"]
    assert seen.get("x-forwarded-proto") == ["http"]
    assert not seen.get("forwarded") and not seen.get("x-forwarded-port")


def test_a_trusted_proxy_says_who_called_but_only_in_its_own_headers(edge):
    seen = _seen_by_replica(edge, "via-proxy", SPOOFED, source="127.0.0.1")
    assert seen.get("x-forwarded-for") == ["6.6.6.6, 127.0.0.1"]  # its chain, then it
    assert seen.get("x-real-ip") == ["6.6.6.6"] and seen.get("x-forwarded-proto") == ["https"]
    for name in ("forwarded", "true-client-ip", "cf-connecting-ip", "x-forwarded-port"):
        assert not seen.get(name), name  # never from anyone


# -- bodies ---------------------------------------------------------------------------------


def test_an_over_long_chunked_body_is_refused_with_413(edge):
    def chunks() -> Iterator[bytes]:
        yield b"x" * 8
        yield b"y" * 92

    answer = httpx.post(edge.url + "/s/pub/upload", content=chunks())
    assert answer.status_code == 413 and "up to 10 bytes" in answer.text, answer.text
    small = httpx.post(edge.url + "/s/pub/upload", content=iter([b"12345"]))
    assert small.status_code == 200


def test_callers_are_counted_by_address_an_ipv6_one_by_its_64():
    assert client_key("203.0.113.7") == "203.0.113.7"
    assert client_key("::ffff:203.0.113.7") == "203.0.113.7"  # a dual-stack socket's IPv4
    one_network = {client_key(f"2001:db8:1:2::{i:x}") for i in range(1, 500)}
    assert one_network == {"2001:db8:1:2::/64"}  # a /64 is one subscriber, not 2**64
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")


def test_websocket_connections_give_back_their_slot_when_they_close(edge):
    """An upgraded connection stays counted while it is open and is released when it
    closes: twelve in a row from one address, five allowed at once, none refused."""
    upgrade = (
        b"GET /s/pub/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    for _ in range(12):
        sock = connect(edge, "127.0.0.4")
        sock.sendall(upgrade)
        answer = closed_within(sock, 10)  # the replica speaks no WebSocket: refused, closed
        assert answer is not None and answer.startswith(b"HTTP/1.1 403 "), answer
        sock.close()
        wait_for(lambda: _router_connections(edge, "127.0.0.4") == 0, 10, "the slot released")
