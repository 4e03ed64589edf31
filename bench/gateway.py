"""The gateway, measured on 127.0.0.1: the router `up` starts, real replicas (tasks), a
real nginx from Debian in front, all in one run.

  latency:    added latency at a paced 500 requests/s (p50, p99) for four paths: the
              replica direct (the floor), nginx -> replica, router -> replica, and
              nginx -> router -> replica
  throughput: requests/s of one router process on small answers, beside nginx direct
              (wrk, 2 threads, 64 connections, 10 s; skipped when wrk is missing)
  streaming:  an SSE event every 250 ms: how late each reaches the client (router, and
              nginx + router)
  failover:   one of two replicas killed under load: GETs failed from 1 s after; then
              10,000 requests of which ~10 % fail in the replica (500): in flight after
  autoscale:  0 -> 6 requests in flight against a target of 2 per replica (max 3): time
              to the first extra replica ready, and replicas over 30 s
  slow:       2,000 slow clients (slowloris: a request head that never ends, a header
              line every 2 s, reconnecting 1 s after being closed) from twenty addresses,
              then from one: real requests paced at 200/s meanwhile (p50, p99, failed),
              the connections the router holds, and what the slow clients were told;
              nginx -> replica under the twenty-address flood beside it

  protocol:   CPU per keep-alive request of uvicorn's httptools protocol and of the
              router's edge protocol, in process with no sockets (what the edge adds)

Latency and throughput are measured in rounds, each path in turn, so that a machine
whose load changes meanwhile weighs on every path alike. `--baseline-src DIR` runs a
second router from another checkout's sources (e.g. a worktree of main) beside this
one, on the same daemon and replica, measured in the same rounds and under the same
slow clients: the before and after of a router change in one run.

Usage: python bench/gateway.py [--seconds 10] [--rounds 5] [--slow-seconds 15]
                               [--only protocol,latency,throughput,sse,failover,autoscale,slow]
                               [--baseline-src /path/to/other/src]
Run it under `prlimit --nofile=1024:<hard>` to see the router raise its own limit (a
router that does not stops answering with 2,000 slow clients and 1,024 files).
Prints a human summary, then JSON on the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import httpx
import psutil
import uvloop
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gpuprovider.gateway.edge import Edge, EdgeHttpProtocol, EdgeLimits
from gpuprovider.testing import Provider, free_port, kill_task_processes, make_home, wait_for

sys.path.insert(0, str(Path(__file__).parent))
from core import ms

REPLICA = r"""
import asyncio, os, random, time
import uvicorn

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/sse":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for _ in range(20):
            await send({"type": "http.response.body", "body": f"data: {time.time()}\n\n".encode(),
                        "more_body": True})
            await asyncio.sleep(0.25)
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/slow":
        await asyncio.sleep(0.5)
    if path == "/flaky" and random.random() < 0.1:
        raise RuntimeError("injected")  # uvicorn drops the connection
    body = b"ok"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": body})

uvicorn.run(app, host="127.0.0.1", port=int(os.environ["PORT"]), log_level="critical",
            access_log=False)
"""


# The slow clients, in a process of their own (their event loop must not delay the
# measuring client's): argv port, count, source addresses (comma-separated), path.
# Prints "ready" once each has connected, then on stdin's end what they were told.
SLOW_CLIENTS = r"""
import asyncio, collections, json, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, count, sources, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4]
told = collections.Counter()
connected = asyncio.Event()

async def one(i):
    source = sources[i % len(sources)]
    while True:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0)
            )
        except OSError:
            told["could not connect"] += 1
            await asyncio.sleep(1)
            continue
        told["connections"] += 1
        if told["connections"] == count:
            connected.set()
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode())
            line = 0
            while True:
                try:
                    data = await asyncio.wait_for(reader.read(64), 2)
                    break
                except TimeoutError:
                    writer.write(b"X-Slow-%d: v\r\n" % line)
                    line += 1
            told[data[9:12].decode() if data.startswith(b"HTTP/") else "closed, no answer"] += 1
        except OSError:
            told["reset"] += 1
        finally:
            writer.close()
        await asyncio.sleep(1)

async def main():
    tasks = [asyncio.create_task(one(i)) for i in range(count)]
    await asyncio.wait_for(connected.wait(), 60)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    print(json.dumps(dict(told)), flush=True)

asyncio.run(main())
"""


def held(port: int) -> int:
    """Established connections whose server end is `port` (the router's, nginx's), as
    `ss` counts them (in a process of its own: parsing /proc/net/tcp here would take
    the measuring client's interpreter)."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return len(out.splitlines())


def server_cpu_s(pid: int) -> float:
    """CPU seconds of a server process and its children (nginx's workers) so far."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def under_slow_clients(
    port: int, url: str, sources: list[str], count: int, seconds: float, pid: int
) -> dict:
    """Real requests paced at 200/s while `count` slow clients hold what they can; the
    server's CPU meanwhile (what a loaded machine cannot blur: the latencies it can)."""
    slow = subprocess.Popen(
        [sys.executable, "-c", SLOW_CLIENTS, str(port), str(count), ",".join(sources), "/s/echo/"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert slow.stdout is not None and slow.stdin is not None
        if slow.stdout.readline().strip() != "ready":
            raise RuntimeError("the slow clients did not connect")
        holding: list[int] = []
        done = threading.Event()

        def sample() -> None:  # the server's established connections, twice a second
            while not done.wait(0.5):
                holding.append(held(port))

        sampler = threading.Thread(target=sample)
        cpu = server_cpu_s(pid)
        sampler.start()
        latencies = asyncio.run(paced(url, 200, seconds))
        done.set()
        sampler.join()
        cpu = server_cpu_s(pid) - cpu
        load = os.getloadavg()[0]
        slow.stdin.close()
        told = json.loads(slow.stdout.readline())
    finally:
        slow.kill()
        slow.wait(10)
    return {
        "slow_clients": count,
        "from_addresses": len(sources),
        "held_min_median_max": [min(holding), sorted(holding)[len(holding) // 2], max(holding)],
        "slow_clients_told": told,
        "real_200rps": ms(latencies),
        "real_failed": FAILED.pop(url, 0),
        "server_cpu_s": round(cpu, 2),
        "load_average_1m": round(load, 1),
    }


FAILED: dict[str, int] = {}


def service(p: Provider, root: Path, name: str, **serve) -> dict:
    script = root / "replica.py"
    script.write_text(REPLICA)
    task = p.submit(
        name=name,
        kind="service",
        command=[sys.executable, str(script)],
        ports=["http"],
        serve={"name": name, "auth": "public", **serve},
    )
    return task


def ready(p: Provider, name: str, count: int, timeout: float = 60) -> dict:
    return wait_for(
        lambda: (s := p.api.get(f"/services/{name}").json()).get("replicas_ready") == count and s,
        timeout,
        f"{count} ready replicas of {name}",
    )


def replica_url(p: Provider, task_id: str) -> str:
    task = p.task(task_id)
    return f"http://127.0.0.1:{task['allocation']['ports']['http']}"


async def paced(url: str, rate: float, seconds: float) -> list[float]:
    """Open loop: a request every 1/rate s whatever the answers do; each one's latency.
    The client is aiohttp: httpx's own pool slows down under this many requests."""
    latencies: list[float] = []
    failures = 0
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector) as client:

        async def one() -> None:
            nonlocal failures
            began = time.perf_counter()
            try:
                async with client.get(url) as answer:
                    await answer.read()
                    failures += answer.status != 200
            except aiohttp.ClientError:
                failures += 1
            latencies.append(time.perf_counter() - began)

        for _ in range(20):  # warm the connections
            await one()
        latencies.clear()
        tasks = []
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    if failures:
        print(f"  {failures} failed requests to {url}")
    FAILED[url] = failures
    return latencies


def nginx_up(root: Path, router: str, replica: str) -> tuple[subprocess.Popen, int, int] | None:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        return None
    to_router, to_replica = free_port(), free_port()
    common = (
        "proxy_http_version 1.1; proxy_set_header Connection ''; proxy_buffering off; "
        "proxy_request_buffering off; proxy_read_timeout 3600s;"
    )
    conf = root / "nginx.conf"
    conf.write_text(
        f"pid {root}/nginx.pid; error_log {root}/nginx-error.log; daemon off; "
        "worker_processes 1; worker_rlimit_nofile 16384;\n"
        "events { worker_connections 8192; }\nhttp { access_log off; "
        f"client_body_temp_path {root}/body; proxy_temp_path {root}/proxy;\n"
        f"upstream router {{ server {router}; keepalive 64; }}\n"
        f"upstream replica {{ server {replica}; keepalive 64; }}\n"
        f"server {{ listen 127.0.0.1:{to_router}; location / {{ proxy_pass http://router; "
        f"proxy_set_header Host $host; {common} }} }}\n"
        f"server {{ listen 127.0.0.1:{to_replica}; location / {{ proxy_pass http://replica; "
        f"{common} }} }}\n}}\n"
    )
    proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(root)])
    wait_for(lambda: _answers(f"http://127.0.0.1:{to_replica}/"), 10, "nginx")
    return proc, to_router, to_replica


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code < 500
    except httpx.TransportError:
        return False


def wrk(url: str, seconds: int, host: str | None = None) -> float | None:
    binary = shutil.which("wrk")
    if binary is None:
        return None
    args = [binary, "-t2", "-c64", f"-d{seconds}s", url]
    if host:
        args[1:1] = ["-H", f"Host: {host}"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 30).stdout
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    return None


async def sse_delays(url: str, headers: dict | None = None) -> list[float]:
    delays = []
    async with (
        httpx.AsyncClient(timeout=60, headers=headers) as client,
        client.stream("GET", url) as answer,
    ):
        async for line in answer.aiter_lines():
            if line.startswith("data: "):
                delays.append(time.time() - float(line[6:]))
    return delays


async def failover(p: Provider, gateway: str, seconds: float) -> dict:
    svc = p.api.get("/services/duo").json()
    victim = svc["replicas"][0]["task_id"]
    pid = p.task(victim)["pid"]
    results: list[tuple[float, bool]] = []
    async with httpx.AsyncClient(timeout=10) as client:

        async def worker(stop_at: float) -> None:
            while time.monotonic() < stop_at:
                try:
                    ok = (await client.get(gateway + "/s/duo/")).status_code == 200
                except httpx.HTTPError:
                    ok = False
                results.append((time.monotonic(), ok))

        stop_at = time.monotonic() + seconds
        workers = [asyncio.create_task(worker(stop_at)) for _ in range(8)]
        await asyncio.sleep(seconds / 3)
        killed_at = time.monotonic()
        subprocess.run(["pkill", "-KILL", "-P", str(pid)], check=False)
        os.kill(pid, signal.SIGKILL)
        await asyncio.gather(*workers)
        flaky = {"ok": 0, "failed": 0}

        async def hammer(n: int) -> None:
            for _ in range(n):
                try:
                    answer = await client.get(gateway + "/s/duo/flaky")
                    flaky["ok" if answer.status_code == 200 else "failed"] += 1
                except httpx.HTTPError:
                    flaky["failed"] += 1

        await asyncio.gather(*(hammer(1250) for _ in range(8)))
    await asyncio.sleep(2.5)  # a report from the router after the last request
    stats = p.api.get("/services/duo").json()["stats"]
    after = [ok for at, ok in results if at >= killed_at + 1.0]
    within = [ok for at, ok in results if killed_at <= at < killed_at + 1.0]
    return {
        "requests": len(results),
        "failed_first_second_after_kill": within.count(False),
        "failed_from_1s_after_kill": after.count(False),
        "flaky_requests": flaky,
        "in_flight_after": stats["in_flight"] if stats else None,
    }


async def autoscale(p: Provider, gateway: str) -> dict:
    began = time.monotonic()
    timeline = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=30) as client:

        async def worker() -> None:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    await client.get(gateway + "/s/elastic/slow")

        workers = [asyncio.create_task(worker()) for _ in range(6)]
        first_extra = None
        while time.monotonic() - began < 30:
            svc = await asyncio.to_thread(lambda: p.api.get("/services/elastic").json())
            timeline.append(
                (round(time.monotonic() - began, 1), svc["replicas_wanted"], svc["replicas_ready"])
            )
            if first_extra is None and (svc["replicas_ready"] or 0) >= 2:
                first_extra = time.monotonic() - began
            await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*workers)
    return {
        "target_in_flight": 2,
        "load_in_flight": 6,
        "first_extra_replica_ready_s": round(first_extra, 1) if first_extra else None,
        "timeline_s_wanted_ready": timeline,
    }


def baseline_router(root: Path, home_root: Path, src: Path) -> tuple[subprocess.Popen, int]:
    """The router of another checkout, on a copy of this home (its own port): the same
    daemon's routes, the same replicas."""
    other = root / "baseline-home"
    shutil.copytree(
        home_root, other, ignore=shutil.ignore_patterns("tasks", "*.db*", "*.sock", "gateway.log")
    )
    gport = free_port()
    env = {**os.environ, "PYTHONPATH": str(src)}
    # the [gateway] keys that checkout knows (an older one refuses newer keys)
    known = subprocess.run(
        [
            sys.executable,
            "-c",
            "from gpuprovider.config import GatewayConfig as G; print(*G.model_fields)",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    text = (other / "provider.toml").read_text()
    head, _, rest = text.partition("[gateway]\n")
    section, nl, tail = rest.partition("\n[")
    lines = [
        line
        for line in section.splitlines()
        if line.startswith("#") or not line.strip() or line.split(" = ")[0] in known
    ]
    section = re.sub(r"(?m)^port = \d+$", f"port = {gport}", "\n".join(lines))
    (other / "provider.toml").write_text(f"{head}[gateway]\n{section}{nl}{tail}")
    with (other / "gateway.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpuprovider", "--home", str(other), "gateway"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    (other / "gateway.pid").write_text(str(proc.pid))
    wait_for(lambda: _answers(f"http://127.0.0.1:{gport}/"), 30, "the baseline router")
    return proc, gport


def in_rounds(paths: dict[str, str], rounds: int, seconds: float) -> dict[str, dict]:
    """Paced 500/s on each path in turn, `rounds` times: each path's latencies."""
    latencies: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, url in paths.items():
            latencies[name] += asyncio.run(paced(url, 500, seconds / rounds))
    return {name: ms(values) for name, values in latencies.items()}


def wrk_rounds(
    paths: dict[str, str], rounds: int, seconds: float, pids: dict[str, int]
) -> dict[str, dict[str, float | None]]:
    """wrk on each path in turn, `rounds` times: each path's median requests/s, and for
    the servers in `pids` their median CPU per request (which a machine busy with other
    work blurs less than requests/s)."""
    seen: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, url in paths.items():
            before = server_cpu_s(pids[name]) if name in pids else 0.0
            span = max(1, round(seconds / rounds))
            if (rps := wrk(url, span)) is not None:
                seen[name].append(rps)
                if name in pids and rps:
                    cpu[name].append((server_cpu_s(pids[name]) - before) / (rps * span) * 1e6)
    return {
        name: {
            "rps": median(seen[name]),
            "server_cpu_us_per_request": median(cpu[name]),
        }
        for name in paths
    }


def median(values: list[float]) -> float | None:
    return round(sorted(values)[len(values) // 2], 1) if values else None


class _Socketless(asyncio.Transport):
    """A transport that writes nowhere: the protocol's own cost, without the kernel's."""

    def __init__(self) -> None:
        super().__init__()
        self.closing = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 8086)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def protocol_cost(requests: int, rounds: int) -> dict[str, float]:
    """CPU per keep-alive request of uvicorn's httptools protocol and of the edge's,
    in this process with no sockets (an application that answers at once): what the
    edge adds to each request, apart from everything a loaded machine adds."""
    answered = asyncio.Event()

    async def app(scope: dict, receive: object, send: object) -> None:
        await send(  # type: ignore[operator]
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]
        answered.set()

    head = (
        b"GET /s/echo/ HTTP/1.1\r\nHost: 127.0.0.1:8086\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
    )

    async def one(kind: str) -> float:
        config = Config(
            app, http="httptools", lifespan="off", proxy_headers=False, access_log=False
        )
        config.load()
        if kind == "edge":
            protocol: HttpToolsProtocol = EdgeHttpProtocol(
                config, ServerState(), {}, edge=Edge(EdgeLimits(), 4096)
            )
        else:
            protocol = HttpToolsProtocol(config, ServerState(), {})
        protocol.connection_made(_Socketless())
        began = time.process_time()
        for _ in range(requests):
            answered.clear()
            protocol.data_received(head)
            await answered.wait()
            await asyncio.sleep(0)
        return (time.process_time() - began) / requests * 1e6

    async def both() -> dict[str, list[float]]:
        seen: dict[str, list[float]] = {"httptools": [], "edge": []}
        for _ in range(rounds):
            for kind in seen:
                seen[kind].append(await one(kind))
        return seen

    seen = uvloop.run(both())
    return {f"{kind}_us_per_request": median(values) or 0.0 for kind, values in seen.items()}


def router_files(home_root: Path) -> dict:
    """The router's open-file limit now, and what it said it runs with (its log)."""
    pid = int((home_root / "gateway.pid").read_text())
    soft, hard = psutil.Process(pid).rlimit(resource.RLIMIT_NOFILE)
    said = [
        line.split(": ", 2)[-1]
        for line in (home_root / "gateway.log").read_text().splitlines()
        if "open files:" in line
    ]
    return {"soft": soft, "hard": hard, "logged": said[-1] if said else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slow-seconds", type=float, default=15.0)
    parser.add_argument("--baseline-src", type=Path, default=None)
    parser.add_argument("--only", default="protocol,latency,throughput,sse,failover,autoscale,slow")
    args = parser.parse_args()
    only = set(args.only.split(","))
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    result: dict = {"bench_open_files": resource.getrlimit(resource.RLIMIT_NOFILE)}
    if "protocol" in only:
        result["protocol_cpu"] = protocol_cost(20000, args.rounds)
        if only == {"protocol"}:  # nothing else needs a daemon
            print(f"protocol CPU per request (no sockets): {result['protocol_cpu']}")
            print(json.dumps(result))
            return
    with tempfile.TemporaryDirectory(prefix="gpp-gateway-") as tmp:
        root = Path(tmp)
        port, gport = free_port(), free_port()
        home = make_home(root / "home", port, gateway_port=gport)
        p = Provider(home, port)
        p.start()
        gateway = f"http://127.0.0.1:{gport}"
        wait_for(lambda: _answers(gateway + "/"), 30, "the gateway")
        nginx = None
        baseline: tuple[subprocess.Popen, int] | None = None
        try:
            result["router_open_files"] = router_files(home.root)
            if args.baseline_src:
                baseline = baseline_router(root, home.root, args.baseline_src.absolute())
                result["baseline_router_open_files"] = router_files(root / "baseline-home")
            task = service(p, root, "echo")
            ready(p, "echo", 1)
            direct = replica_url(p, task["id"])
            nginx = nginx_up(root, f"127.0.0.1:{gport}", direct.removeprefix("http://"))
            paths = {"replica direct": direct + "/", "router": gateway + "/s/echo/"}
            if baseline:
                paths["router (baseline)"] = f"http://127.0.0.1:{baseline[1]}/s/echo/"
            if nginx:
                paths["nginx -> replica"] = f"http://127.0.0.1:{nginx[2]}/"
                paths["nginx -> router"] = f"http://127.0.0.1:{nginx[1]}/s/echo/"
            if "latency" in only:
                result["latency_500rps"] = in_rounds(paths, args.rounds, args.seconds)
                result["load_average_1m_after_latency"] = round(os.getloadavg()[0], 1)
            if "throughput" in only:
                pids = {"router": int((home.root / "gateway.pid").read_text())}
                if baseline:
                    pids["router (baseline)"] = baseline[0].pid
                if nginx:
                    pids["nginx -> replica"] = nginx[0].pid
                result["throughput_rps"] = wrk_rounds(
                    {k: v for k, v in paths.items() if k != "nginx -> router"},
                    args.rounds,
                    args.seconds,
                    pids,
                )
            if "sse" in only:
                result["sse_delay"] = {
                    "replica direct": ms(asyncio.run(sse_delays(direct + "/sse"))),
                    "router": ms(asyncio.run(sse_delays(gateway + "/s/echo/sse"))),
                }
                if nginx:
                    result["sse_delay"]["nginx -> router"] = ms(
                        asyncio.run(sse_delays(f"http://127.0.0.1:{nginx[1]}/s/echo/sse"))
                    )
            if "slow" in only:
                twenty = [f"127.0.0.{i}" for i in range(2, 22)]
                rpid = int((home.root / "gateway.pid").read_text())
                result["slow_clients"] = {
                    "router, twenty addresses": under_slow_clients(
                        gport, gateway + "/s/echo/", twenty, 2000, args.slow_seconds, rpid
                    ),
                    "router, one address": under_slow_clients(
                        gport, gateway + "/s/echo/", ["127.0.0.2"], 2000, args.slow_seconds, rpid
                    ),
                }
                if baseline:
                    result["slow_clients"]["router (baseline), twenty addresses"] = (
                        under_slow_clients(
                            baseline[1],
                            f"http://127.0.0.1:{baseline[1]}/s/echo/",
                            twenty,
                            2000,
                            args.slow_seconds,
                            baseline[0].pid,
                        )
                    )
                if nginx:
                    result["slow_clients"]["nginx -> replica, twenty addresses"] = (
                        under_slow_clients(
                            nginx[2],
                            f"http://127.0.0.1:{nginx[2]}/",
                            twenty,
                            2000,
                            args.slow_seconds,
                            nginx[0].pid,
                        )
                    )
            if baseline:  # its figures would mix with this router's in the daemon's
                baseline[0].terminate()
                baseline[0].wait(10)
                baseline = None
            if "failover" in only:
                service(p, root, "duo", replicas=2, readiness={"period_s": 0.5})
                ready(p, "duo", 2)
                result["failover"] = asyncio.run(failover(p, gateway, 6.0))
            if "autoscale" in only:
                service(
                    p,
                    root,
                    "elastic",
                    autoscale={
                        "min": 1,
                        "max": 3,
                        "target_in_flight": 2,
                        "up_delay_s": 0,
                        "down_delay_s": 60,
                    },
                )
                ready(p, "elastic", 1)
                result["autoscale"] = asyncio.run(autoscale(p, gateway))
        finally:
            if baseline:
                baseline[0].terminate()
                baseline[0].wait(10)
            if nginx:
                nginx[0].terminate()
                nginx[0].wait(10)
            p.cancel_all()
            p.stop()
            kill_task_processes(home)
    if "protocol_cpu" in result:
        print(f"protocol CPU per request (no sockets): {result['protocol_cpu']}")
    print(f"router open files: {result['router_open_files']}")
    if "baseline_router_open_files" in result:
        print(f"baseline router open files: {result['baseline_router_open_files']}")
    for name, figures in result.get("latency_500rps", {}).items():
        print(f"500 req/s {name:18} p50 {figures['p50_ms']} ms  p99 {figures['p99_ms']} ms")
    if "throughput_rps" in result:
        print(f"throughput (wrk): {result['throughput_rps']}")
    if "sse_delay" in result:
        print(f"SSE event delay: {result['sse_delay']}")
    for name, figures in result.get("slow_clients", {}).items():
        real = figures["real_200rps"]
        print(
            f"2,000 slow clients, {name}: real p50 {real['p50_ms']} ms p99 {real['p99_ms']} ms, "
            f"{figures['real_failed']} failed; held {figures['held_min_median_max']}; "
            f"server CPU {figures['server_cpu_s']} s, load {figures['load_average_1m']}; "
            f"slow ones told {figures['slow_clients_told']}"
        )
    if "failover" in result:
        print(f"failover: {result['failover']}")
    if "autoscale" in result:
        a = result["autoscale"]
        print(f"autoscale: first extra replica ready after {a['first_extra_replica_ready_s']} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
