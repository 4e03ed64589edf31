"""Services through the gateway: real replicas (Python HTTP servers run as tasks), the
real router process `up` starts, a real nginx from Debian's packages in front with a
certificate the test makes. Routing by host and path, tokens at the edge, streaming,
WebSockets, failover, replicas kept, scaled and autoscaled."""

import asyncio
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import websockets

from gpuprovider.gateway import nginx
from gpuprovider.gateway.router import Route, Router
from gpuprovider.gateway.tls import self_signed
from gpuprovider.testing import Provider, free_port, kill_task_processes, make_home, wait_for

pytestmark = pytest.mark.slow

# A replica: answers GET with its task id, the path and the Authorization it saw;
# /stream sends SSE events, the second only once a marker file exists; /slow waits for
# a marker; /ws echoes WebSocket frames.
REPLICA = r"""
import asyncio, os, pathlib, sys
import websockets
from websockets.asyncio.server import serve
from websockets.http11 import Response
from websockets.datastructures import Headers

TASK = os.environ["GPUPROVIDER_TASK_ID"]
MARKS = pathlib.Path(sys.argv[1])

async def echo(ws):
    async for frame in ws:
        await ws.send(f"{TASK}:{frame}")

def respond(status, body, headers=()):
    h = Headers([("Content-Length", str(len(body))), *headers])
    return Response(status, "OK", h, body)

async def http(connection, request):
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return None
    path = request.path
    if path.startswith("/slow"):
        while not (MARKS / "release").exists():
            await asyncio.sleep(0.05)
    if path.startswith("/missing"):
        return respond(404, b"not here")
    auth = request.headers.get("Authorization")
    body = f"{TASK} {path} auth={auth}".encode()
    return respond(200, body)

async def main():
    async with serve(echo, "127.0.0.1", int(os.environ["PORT"]), process_request=http):
        await asyncio.Future()

asyncio.run(main())
"""

# SSE needs a streaming HTTP server: a tiny raw one on its own port name.
STREAMER = r"""
import os, pathlib, socket, sys, time, threading
MARKS = pathlib.Path(sys.argv[1])
def serve(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    def chunk(text):
        payload = text.encode()
        conn.sendall(b"%x\r\n%s\r\n" % (len(payload), payload))
    chunk("data: first\n\n")
    while not (MARKS / "go-on").exists():
        time.sleep(0.02)
    chunk("data: second\n\n")
    conn.sendall(b"0\r\n\r\n")
    conn.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["PORT"]))); s.listen(16)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    root = tmp_path_factory.mktemp("gateway")
    port, gateway_port = free_port(), free_port()
    home = make_home(root / "home", port, gateway_port=gateway_port)
    home.config.write_text(home.config.read_text().replace('domain = ""', 'domain = "gpu.test"'))
    provider = Provider(home, port)
    provider.start()
    (root / "replica.py").write_text(REPLICA)
    (root / "streamer.py").write_text(STREAMER)
    provider.gateway = f"http://127.0.0.1:{gateway_port}"
    wait_for(lambda: _answers(provider.gateway), 30, "the gateway `up` starts")
    provider.marks = root / "marks"
    provider.marks.mkdir()
    provider.root = root
    yield provider
    provider.cancel_all()
    provider.stop()
    kill_task_processes(home)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/", timeout=2).status_code == 404  # no service named there
    except httpx.TransportError:
        return False


def _service(p: Provider, name: str, script: str = "replica.py", **serve) -> dict:
    task = p.submit(
        name=name,
        kind="service",
        command=[sys.executable, str(p.root / script), str(p.marks)],
        ports=["http"],
        serve={"name": name, **serve},
    )
    return task


def _auth(p: Provider) -> dict:
    return {"Authorization": f"Bearer {p.token}"}


def _ready(p: Provider, name: str, count: int, timeout: float = 30) -> dict:
    return wait_for(
        lambda: (s := p.api.get(f"/services/{name}").json()).get("replicas_ready") == count and s,
        timeout,
        f"{count} ready replicas of {name}",
    )


def test_a_service_answers_by_host_and_by_path_with_a_token(gw):
    made = _service(gw, "hello", replicas=2)
    urls = made["service"]["urls"]
    assert urls[0] == "https://hello.gpu.test/" and urls[1].startswith("http://hello.localhost:")
    _ready(gw, "hello", 2)
    seen = set()
    for _ in range(10):
        by_path = httpx.get(gw.gateway + "/s/hello/x?y=1", headers=_auth(gw))
        assert by_path.status_code == 200, by_path.text
        task_id, path, auth = by_path.text.split(" ")
        assert path == "/x?y=1" and auth == "auth=None"  # the provider token never goes up
        assert by_path.headers["x-accel-buffering"] == "no"
        seen.add(task_id)
    assert len(seen) == 2  # both replicas take traffic
    by_host = httpx.get(gw.gateway + "/a", headers={"Host": "hello.localhost", **_auth(gw)})
    assert by_host.status_code == 200 and " /a " in by_host.text

    assert httpx.get(gw.gateway + "/s/hello/").status_code == 401
    stranger = gw.tenant("stranger")
    token = stranger.headers["Authorization"]
    refused = httpx.get(gw.gateway + "/s/hello/", headers={"Authorization": token})
    assert refused.status_code == 403  # another tenant's token
    own = gw.api.post(
        "/tokens", json={"name": "hello-client", "scopes": ["service:hello"], "tenant": "admin"}
    ).json()["token"]
    wait_for(
        lambda: (
            httpx.get(
                gw.gateway + "/s/hello/", headers={"Authorization": f"Bearer {own}"}
            ).status_code
            == 200
        ),
        5,
        "the per-service token to reach the router",
    )
    assert gw.api.get("/tasks", headers={"Authorization": f"Bearer {own}"}).status_code == 403
    odd = gw.api.post("/tokens", json={"name": "odd", "scopes": ["service:../Hello World"]})
    assert odd.status_code == 422 and "service:<name>" in odd.text
    other = gw.api.post(
        "/tokens", json={"name": "open-client", "scopes": ["service:open"], "tenant": "admin"}
    ).json()["token"]
    assert (
        httpx.get(  # another service's token, fetched by now or not: refused either way
            gw.gateway + "/s/hello/", headers={"Authorization": f"Bearer {other}"}
        ).status_code
        == 403
    )
    missing = httpx.get(gw.gateway + "/s/nothing-here/", headers=_auth(gw))
    assert missing.status_code == 404 and "no service 'nothing-here'" in missing.text
    listed = gw.cli("service", "list")
    assert listed.returncode == 0 and "hello" in listed.stdout and "2/2/2" in listed.stdout


def test_public_services_need_no_token_and_pass_other_authorization_on(gw):
    _service(gw, "open", auth="public", rate_per_s=2, max_body_bytes=10)
    _ready(gw, "open", 1)
    answer = httpx.get(gw.gateway + "/s/open/", headers={"Authorization": "Basic app-own"})
    assert answer.status_code == 200 and answer.text.endswith("auth=Basic app-own")
    leaked = httpx.get(gw.gateway + "/s/open/", headers=_auth(gw))
    assert leaked.status_code == 200 and leaked.text.endswith("auth=None")  # not even here
    big = httpx.post(gw.gateway + "/s/open/", content=b"x" * 100)
    assert big.status_code == 413 and "10 bytes" in big.text
    burst = [httpx.get(gw.gateway + "/s/open/").status_code for _ in range(3)]
    assert 429 in burst  # 2 requests/s, and the bucket holds one second's worth


def test_answers_stream_through_without_buffering(gw):
    _service(gw, "sse", script="streamer.py", auth="public")
    _ready(gw, "sse", 1)
    with httpx.stream("GET", gw.gateway + "/s/sse/events", timeout=30) as answer:
        chunks = answer.iter_raw()
        first = next(chunks)
        # the replica holds its second event until we say so: the first arrived alone
        assert b"first" in first and b"second" not in first
        (gw.marks / "go-on").touch()
        rest = b"".join(chunks)
    assert b"second" in rest


def test_websockets_are_tunnelled(gw):
    _service(gw, "ws", auth="public")
    _ready(gw, "ws", 1)
    url = gw.gateway.replace("http://", "ws://") + "/s/ws/chat"

    async def talk() -> list[str]:
        async with websockets.connect(url) as ws:
            await ws.send("hi")
            one = await ws.recv()
            await ws.send("again")
            return [one, await ws.recv()]

    got = asyncio.run(talk())
    assert got[0].endswith(":hi") and got[1].endswith(":again")


def test_a_killed_replica_fails_no_idempotent_request_and_is_replaced(gw):
    _service(gw, "sturdy", replicas=2, readiness={"period_s": 0.5})
    service = _ready(gw, "sturdy", 2)
    victim = service["replicas"][0]["task_id"]
    pid = gw.task(victim)["pid"]
    failures = 0
    subprocess.run(["pkill", "-KILL", "-P", str(pid)], check=False)
    subprocess.run(["kill", "-KILL", str(pid)], check=False)
    for _ in range(100):
        answer = httpx.get(gw.gateway + "/s/sturdy/", headers=_auth(gw))
        failures += answer.status_code != 200
    assert failures == 0
    # the service restarts its replica (or the set replaces it): two ready again
    _ready(gw, "sturdy", 2, timeout=60)
    stats = wait_for(
        lambda: (
            (s := gw.api.get("/services/sturdy").json()["stats"])
            and s["requests"]["300s"] >= 100  # however long the restart took
            and s
        ),
        10,
        "the router's figures",
    )
    assert stats["in_flight"] == 0


def test_scaling_by_hand_and_a_cancelled_replica_is_replaced(gw):
    _service(gw, "scaled")
    _ready(gw, "scaled", 1)
    out = gw.cli("service", "scale", "scaled", "3")
    assert out.returncode == 0, out.stderr
    service = _ready(gw, "scaled", 3)
    gw.api.post(f"/tasks/{service['replicas'][1]['task_id']}/cancel")
    wait_for(
        lambda: (
            len(
                [
                    r
                    for r in gw.api.get("/services/scaled").json()["replicas"]
                    if r["state"] == "running"
                ]
            )
            == 3
        ),
        30,
        "a replacement replica",
    )
    gw.cli("service", "scale", "scaled", "1")
    wait_for(lambda: gw.api.get("/services/scaled").json()["replicas_live"] == 1, 30, "scale down")
    events = gw.api.get("/services/scaled").json()["events"]
    assert any("draining" in e["reason"] for e in events)
    assert any("scaled 1 -> 3" in e["reason"] for e in events)


def test_autoscaling_follows_requests_in_flight(gw):
    _service(
        gw,
        "elastic",
        autoscale={"min": 1, "max": 2, "target_in_flight": 1, "up_delay_s": 0, "down_delay_s": 1},
    )
    _ready(gw, "elastic", 1)
    (gw.marks / "release").unlink(missing_ok=True)

    async def hold(n: int) -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            calls = [
                client.get(gw.gateway + "/s/elastic/slow", headers=_auth(gw)) for _ in range(n)
            ]
            answers = await asyncio.gather(*calls)
            return [a.status_code for a in answers]

    async def scenario() -> list[int]:
        held = asyncio.create_task(hold(3))
        await asyncio.to_thread(
            wait_for,
            lambda: gw.api.get("/services/elastic").json()["replicas_wanted"] == 2,
            30,
            "a second replica for 3 requests in flight",
        )
        (gw.marks / "release").touch()
        return await held

    assert asyncio.run(scenario()) == [200, 200, 200]
    wait_for(
        lambda: gw.api.get("/services/elastic").json()["replicas_wanted"] == 1, 30, "back to 1"
    )
    events = [e["reason"] for e in gw.api.get("/services/elastic").json()["events"]]
    assert any("autoscale 1 -> 2" in e for e in events) and any(
        "autoscale 2 -> 1" in e for e in events
    )


def test_a_service_with_no_ready_replica_says_503_retry_after(gw):
    _service(gw, "never", readiness={"path": "/missing", "period_s": 0.5})
    wait_for(lambda: gw.api.get("/services/never").json()["replicas_live"] == 1, 20)
    answer = wait_for(
        lambda: (
            (a := httpx.get(gw.gateway + "/s/never/", headers=_auth(gw))).status_code == 503 and a
        ),
        20,
        "a 503",
    )
    assert answer.headers["retry-after"] == "1"


@pytest.mark.parametrize(
    ("serve", "status", "says"),
    [
        ({"name": "Not_A_Label"}, 422, "serve.name"),
        ({"name": "bad", "readiness": {"path": "health"}}, 422, "not a path"),
        ({"name": "bad", "autoscale": {"min": 3, "max": 2, "target_in_flight": 1}}, 422, "above"),
        (
            {"name": "bad", "autoscale": {"min": 1, "max": 2, "target_in_flight": 0}},
            422,
            "target_in_flight",
        ),
        ({"name": "bad", "replicas": 0}, 422, "replicas"),
        ({"name": "hello"}, 409, "live already"),
    ],
)
def test_bad_service_specs_are_refused_naming_the_field(gw, serve, status, says):
    answer = gw.api.post(
        "/tasks",
        json={
            "name": "x",
            "kind": "service",
            "command": ["true"],
            "ports": ["http"],
            "serve": serve,
        },
    )
    assert answer.status_code == status and says in answer.text, answer.text


def test_nginx_in_front_terminates_tls_for_the_wildcard_domain(gw, tmp_path):
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx_bin).exists():
        pytest.skip("nginx missing: `make test` installs Debian's nginx")
    _service(gw, "tls", auth="public")
    _ready(gw, "tls", 1)
    self_signed("gpu.test", tmp_path / "c.pem", tmp_path / "k.pem")
    listen = free_port()
    router = gw.gateway.removeprefix("http://")
    site = nginx.render(
        "gpu.test",
        tmp_path / "c.pem",
        tmp_path / "k.pem",
        router,
        f"127.0.0.1:{listen}",
        f"127.0.0.1:{free_port()}",
    )
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log; daemon off;\n"
        f"events {{}}\nhttp {{ access_log off; client_body_temp_path {tmp_path}/body; "
        f"proxy_temp_path {tmp_path}/proxy;\n{site}\n}}\n"
    )
    check = subprocess.run(
        [nginx_bin, "-t", "-c", str(conf), "-p", str(tmp_path)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    server = subprocess.Popen([nginx_bin, "-c", str(conf), "-p", str(tmp_path)])
    try:

        def through() -> httpx.Response | None:
            try:
                return httpx.get(
                    f"https://127.0.0.1:{listen}/hi",
                    headers={"Host": "tls.gpu.test"},
                    verify=False,  # the test's own certificate; what is checked is the path
                    timeout=5,
                )
            except httpx.TransportError:
                return None

        answer = wait_for(through, 20, "nginx to answer")
        assert answer.status_code == 200 and " /hi " in answer.text
    finally:
        server.terminate()
        server.wait(10)
    with pytest.raises(ValueError, match=r"not \*\.other\.test"):
        nginx.render("other.test", tmp_path / "c.pem", tmp_path / "k.pem", router)


def test_sticky_services_keep_a_client_on_its_replica(gw):
    _service(gw, "session", replicas=2, sticky=True)
    _ready(gw, "session", 2)
    with httpx.Client(headers=_auth(gw)) as client:  # keeps the router's cookie
        seen = {client.get(gw.gateway + "/s/session/").text.split(" ")[0] for _ in range(8)}
    assert len(seen) == 1
    other = next(
        r["task_id"] for r in _ready(gw, "session", 2)["replicas"] if r["task_id"] not in seen
    )
    by_header = {  # no cookie: the client names the replica it wants
        httpx.get(
            gw.gateway + "/s/session/", headers={**_auth(gw), "X-Gpp-Replica": other}
        ).text.split(" ")[0]
        for _ in range(8)
    }
    assert by_header == {other}
    out = gw.cli("task", "get", "session")
    assert "service session: https://session.gpu.test/" in out.stdout


def test_the_router_terminates_tls_itself_with_configured_files(tmp_path):
    self_signed("localhost", tmp_path / "c.pem", tmp_path / "k.pem")
    port, gateway_port = free_port(), free_port()
    home = make_home(tmp_path / "home", port, gateway_port=gateway_port)
    text = home.config.read_text()
    text = text.replace('tls_cert = ""', f'tls_cert = "{tmp_path / "c.pem"}"')
    text = text.replace('tls_key = ""', f'tls_key = "{tmp_path / "k.pem"}"')
    home.config.write_text(text)
    provider = Provider(home, port)
    provider.start()
    try:
        task = provider.submit(
            name="secure",
            kind="service",
            command=[sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "0"],
            ports=["http"],
        )
        assert task["service"]["urls"][1].startswith("https://127.0.0.1:")

        def answered() -> int | None:
            try:
                trusted = ssl.create_default_context(cafile=str(tmp_path / "c.pem"))
                return httpx.get(
                    f"https://127.0.0.1:{gateway_port}/s/nothing/", verify=trusted
                ).status_code
            except httpx.TransportError:
                return None

        assert wait_for(answered, 30, "the router over TLS") == 404
    finally:
        provider.cancel_all()
        provider.stop()
        kill_task_processes(home)


def _up(home) -> subprocess.CompletedProcess:
    """`gpuprovider up` on `home`, expected to refuse its config."""
    return subprocess.run(
        [sys.executable, "-m", "gpuprovider", "--home", str(home.root), "up"],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("gateway", "says"),
    [
        ('domain = "Not A Domain"', "is not a domain"),
        ('tls_cert = "/nonexistent.pem"\ntls_key = "/nonexistent.key"', "does not exist"),
        ('tls_cert = "/x.pem"', "go together"),
    ],
)
def test_bad_gateway_settings_stop_the_daemon_naming_the_key(tmp_path, gateway, says):
    home = make_home(tmp_path / "home", free_port())
    text = home.config.read_text().replace("[gateway]\n", f"[gateway]\n{gateway}\n", 1)
    for key in ("domain", "tls_cert", "tls_key"):
        if f"\n{key} = " in gateway or gateway.startswith(f"{key} = "):
            text = text.replace(f'\n{key} = ""\n', "\n", 1)
    home.config.write_text(text)
    out = _up(home)
    assert out.returncode == 2 and "[gateway]" in out.stderr and says in out.stderr, out.stderr


def test_a_certificate_for_another_domain_is_refused(tmp_path):
    self_signed("other.test", tmp_path / "c.pem", tmp_path / "k.pem")
    home = make_home(tmp_path / "home", free_port())
    text = home.config.read_text()
    text = text.replace('domain = ""', 'domain = "gpu.test"')
    text = text.replace('tls_cert = ""', f'tls_cert = "{tmp_path / "c.pem"}"')
    text = text.replace('tls_key = ""', f'tls_key = "{tmp_path / "k.pem"}"')
    home.config.write_text(text)
    out = _up(home)
    assert out.returncode == 2 and "not *.gpu.test" in out.stderr, out.stderr


def test_scaling_down_lets_a_drained_replica_finish_what_it_serves(gw):
    _service(gw, "drained", replicas=2, sticky=True)
    service = _ready(gw, "drained", 2)
    newest = service["replicas"][-1]["task_id"]  # scaling down drains the newest first
    (gw.marks / "release").unlink(missing_ok=True)

    async def scenario() -> int:
        async with httpx.AsyncClient(timeout=60) as client:
            held = asyncio.create_task(
                client.get(
                    gw.gateway + "/s/drained/slow",
                    headers={**_auth(gw), "X-Gpp-Replica": newest},
                )
            )
            await asyncio.to_thread(
                wait_for,
                lambda: gw.api.get("/services/drained").json()["stats"]["in_flight"] == 1,
                10,
                "the request in flight",
            )
            await asyncio.to_thread(gw.cli, "service", "scale", "drained", "1")
            await asyncio.to_thread(
                wait_for,
                lambda: any(
                    r["draining"] for r in gw.api.get("/services/drained").json()["replicas"]
                ),
                10,
                "the replica to drain",
            )
            await asyncio.sleep(3)  # several router reports: it must not be stopped meanwhile
            assert gw.task(newest)["state"] == "running"
            (gw.marks / "release").touch()
            answer = await held
            assert newest in answer.text
            return answer.status_code

    assert asyncio.run(scenario()) == 200
    wait_for(lambda: gw.task(newest)["state"] == "cancelled", 20, "the drained replica to stop")


def test_forwarded_headers_are_believed_only_from_a_proxy_on_this_machine():
    """A caller elsewhere cannot tell a replica it is someone else; nginx in front can
    tell it who called (its chain kept, itself appended)."""
    router = Router("http://127.0.0.1:1", "unused")
    route = Route("web", "t", "public", False, 1 << 20, None, {})
    spoof = [(b"host", b"web.gpu.test"), (b"x-forwarded-for", b"1.2.3.4")]

    def seen(peer: str) -> dict[bytes, bytes]:
        scope = {"client": (peer, 5000), "scheme": "http", "headers": spoof}
        return dict(router._upstream_headers(scope, route))

    assert seen("10.0.0.7")[b"x-forwarded-for"] == b"10.0.0.7"
    assert seen("127.0.0.1")[b"x-forwarded-for"] == b"1.2.3.4, 127.0.0.1"
    assert seen("10.0.0.7")[b"x-forwarded-host"] == b"web.gpu.test"
