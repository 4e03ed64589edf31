"""Dashboard figures: server time per page, bytes per first load, live update delay.

A real daemon on 127.0.0.1 over a store holding --tasks finished tasks (with their
journal rows) and --nodes nodes of 8 simulated GPUs each. Each page is fetched
--repeat times by a signed-in client; the baseline, in the same run on the same
daemon, is the API's own answer for the same data (`GET /api/v1/tasks?limit=50` for the
task list, `GET /api/v1/nodes` for the nodes, `GET /api/v1/health` for the cheapest
round trip). The live update delay is from an API call that makes a transition (a
node cordoned, then resumed) to the dashboard's `/ui/events` telling the page, against
the API's own `/events/stream` seeing the same row.

The cost of --followers dashboards following one task's log (a line every 0.1 s) is the
daemon's CPU over 10 s, against the same 10 s with no one following.

Usage: python bench/dashboard.py [--tasks 100000] [--nodes 50] [--repeat 50] [--followers 100]
Prints a human summary, then JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
from sqlalchemy import insert

from gpuprovider.lifecycle import nodes as lifecycle_nodes
from gpuprovider.store import migrate, schema
from gpuprovider.store.store import Store
from gpuprovider.store.tasks import new_task_id
from gpuprovider.testing import Provider, free_port, kill_task_processes, make_home, node_record


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def figures(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(pct(values, 50) * 1000, 2),
        "p95_ms": round(pct(values, 95) * 1000, 2),
        "mean_ms": round(statistics.fmean(values) * 1000, 2),
    }


def fill(url: str, tasks: int, nodes: int) -> None:
    """`tasks` finished tasks of 20 tenants with their journal rows, and `nodes` nodes
    of 8 GPUs."""
    store = Store(url)
    migrate.upgrade(store)
    now = time.time()
    batch, events = [], []
    for i in range(tasks):
        task_id = new_task_id()
        tenant = "admin" if i % 20 == 0 else f"tenant-{i % 20}"
        batch.append(
            {
                "id": task_id, "name": f"job-{i}", "live_name": None, "tenant": tenant,
                "kind": "job", "state": "succeeded", "state_reason": "exited with code 0",
                "spec": {"command": ["true"], "resources": {"gpu": "1"}}, "priority": 0,
                "attempt": 1, "not_before": 0.0, "exit_code": 0, "created_at": now - tasks + i,
                "updated_at": now, "started_at": now, "finished_at": now, "version": 3,
            }
        )  # fmt: skip
        for src, dst in ((None, "submitted"), ("submitted", "queued"), ("running", "succeeded")):
            events.append(
                {
                    "kind": "task", "subject": task_id, "tenant": tenant, "at": now,
                    "from_state": src, "to_state": dst, "reason": "bench",
                }
            )  # fmt: skip
        if len(batch) == 10_000 or i == tasks - 1:
            with store.engine.begin() as conn:
                conn.execute(insert(schema.tasks), batch)
                conn.execute(insert(schema.journal), events)
            batch, events = [], []
    with store.tx() as tx:
        for n in range(nodes):
            lifecycle_nodes.node_seen(tx, node_record(f"n-bench-{n}", f"bench-{n}", gpus=8))
    store.close()


def sign_in(url: str, token: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=60, follow_redirects=True)
    form = client.get("/ui/signin")
    pre = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    done = client.post("/ui/signin", data={"csrf": pre, "token": token})
    assert done.status_code == 200, done.text  # followed to the overview
    return client


def timed(client: httpx.Client, path: str, repeat: int, **kwargs) -> list[float]:
    client.get(path, **kwargs)  # warm: templates compiled, statements cached
    spent = []
    for _ in range(repeat):
        start = time.perf_counter()
        answer = client.get(path, **kwargs)
        spent.append(time.perf_counter() - start)
        assert answer.status_code == 200, (path, answer.status_code)
    return spent


def first_load_bytes(client: httpx.Client) -> dict[str, int]:
    page = client.get("/ui/")
    assets = re.findall(r'(?:src|href)="(/ui/static/[^"]+)"', page.text)
    sizes = {path: len(client.get(path).content) for path in assets}
    return {
        "html": len(page.content),
        "assets": sum(sizes.values()),
        "total": len(page.content) + sum(sizes.values()),  # uncompressed: no gzip here
    }


def live_delay(provider: Provider, client: httpx.Client, url: str, rounds: int) -> list[float]:
    """From a node's transition requested over the API to the stream at `url` saying so."""
    node = next(n["id"] for n in provider.api.get("/nodes").json() if "bench" not in n["id"])
    seen: list[float] = []
    ready = threading.Event()
    got = threading.Event()

    def listen() -> None:
        with client.stream("GET", url, timeout=None) as stream:
            for line in stream.iter_lines():
                if line.startswith(":"):
                    ready.set()
                elif line.startswith("data:"):
                    seen.append(time.perf_counter())
                    got.set()
                if len(seen) >= rounds:
                    return

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    ready.wait(10)
    delays = []
    for i in range(rounds):
        got.clear()
        start = time.perf_counter()
        action = "cordon" if i % 2 == 0 else "resume"
        assert provider.api.post(f"/nodes/{node}/{action}").status_code == 200
        assert got.wait(10), "no event came"
        delays.append(seen[-1] - start)
    thread.join(10)
    return delays


def followers_cost(provider: Provider, session: httpx.Client, followers: int, span_s: float):
    """Cores the daemon uses while a task writes a line every 0.1 s: with no one
    following its log (the baseline), then with `followers` dashboards following it."""
    script = (
        "import time\n"
        "for i in range(100000):\n"
        "    print('line', i, flush=True)\n"
        "    time.sleep(0.1)\n"
    )
    task = provider.submit(name="chatty", command=["/usr/bin/python3", "-c", script])
    provider.wait_state(task["id"], "running", 60)
    daemon = psutil.Process(provider.proc.pid)

    def cores() -> float:
        before, start = daemon.cpu_times(), time.perf_counter()
        time.sleep(span_s)
        after = daemon.cpu_times()
        spent = (after.user - before.user) + (after.system - before.system)
        return spent / (time.perf_counter() - start)

    alone = cores()
    cookie = {"gpp_session": session.cookies["gpp_session"]}
    limits = httpx.Limits(max_connections=followers + 8)
    reading = threading.Barrier(followers + 1, timeout=120)
    stop = threading.Event()

    def follow() -> None:
        with httpx.Client(base_url=provider.url, cookies=cookie, limits=limits) as client:
            path = f"/ui/tasks/{task['id']}/log/stream"
            with client.stream("GET", path, timeout=None) as stream:
                lines = stream.iter_lines()
                next(line for line in lines if line.startswith("data:"))
                reading.wait()
                for _ in lines:
                    if stop.is_set():
                        return

    threads = [threading.Thread(target=follow, daemon=True) for _ in range(followers)]
    for thread in threads:
        thread.start()
    reading.wait()
    followed = cores()
    stop.set()
    provider.api.post(f"/tasks/{task['id']}/cancel")
    return {
        "cores_with_no_follower": round(alone, 4),
        f"cores_with_{followers}": round(followed, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--followers", type=int, default=100)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gpp-bench-ui-"))
    port = free_port()
    home = make_home(root / "home", port)
    fill(home.store_url(""), args.tasks, args.nodes)
    provider = Provider(home, port)
    provider.start_timeout_s = 120
    provider.start()
    try:
        client = sign_in(provider.url, provider.token)
        listing = client.get("/ui/tasks").text
        deep = re.search(r'rel="next" href="/ui/tasks\?([^"]+)"', listing)
        task_id = re.search(r'href="/ui/tasks/(t-[0-9a-f]+)"', listing).group(1)
        api = provider.api
        pages = {
            "overview": timed(client, "/ui/", args.repeat),
            "tasks": timed(client, "/ui/tasks", args.repeat),
            "tasks_next_page": timed(client, "/ui/tasks?" + deep.group(1), args.repeat),
            "tasks_of_a_tenant": timed(client, "/ui/tasks?tenant=tenant-7", args.repeat),
            "task": timed(client, f"/ui/tasks/{task_id}", args.repeat),
            "nodes": timed(client, "/ui/nodes", args.repeat),
            "node": timed(client, f"/ui/nodes/n-bench-{args.nodes // 2}", args.repeat),
            "services": timed(client, "/ui/services", args.repeat),
        }
        baseline = {
            "api_health": timed(api, "/health", args.repeat),
            "api_tasks_limit_50": timed(api, "/tasks", args.repeat, params={"limit": 50}),
            "api_nodes": timed(api, "/nodes", args.repeat),
        }
        loaded = first_load_bytes(client)
        ui_delay = live_delay(provider, client, "/ui/events", 20)
        api_delay = live_delay(provider, provider.api, "/events/stream?after=now", 20)
        following = followers_cost(provider, client, args.followers, 10.0)
    finally:
        provider.stop()
        kill_task_processes(provider.home)
    result = {
        "tasks": args.tasks,
        "nodes": args.nodes,
        "gpus": args.nodes * 8 + 3,
        "pages": {name: figures(v) for name, v in pages.items()},
        "baseline": {name: figures(v) for name, v in baseline.items()},
        "first_load_bytes": loaded,
        "log_followers": following,
        "live_update_delay": {
            "ui_events": figures(ui_delay),
            "api_events_stream": figures(api_delay),
        },
    }
    for name, value in result["pages"].items():
        print(f"{name:20s} p50 {value['p50_ms']:8.2f} ms   p95 {value['p95_ms']:8.2f} ms")
    for name, value in result["baseline"].items():
        print(
            f"{name:20s} p50 {value['p50_ms']:8.2f} ms   p95 {value['p95_ms']:8.2f} ms (baseline)"
        )
    print(f"first load: {loaded['total']} bytes ({loaded['html']} of HTML)")
    print(f"live update delay: {result['live_update_delay']}")
    print(f"daemon cores, a task's log followed: {following}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
