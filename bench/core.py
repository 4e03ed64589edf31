"""Provider-core figures: submit->running latency, API throughput, daemon footprint.

Each figure is measured against a baseline in the same run:
  - latency against starting the same trivial job with a bare subprocess.Popen;
  - API throughput against a bare uvicorn app answering the same requests
    without validation, storage or scheduling (the HTTP stack's ceiling here).

Two bursts of trivial jobs on 8 GPUs: back to back (the client submits as fast as the
daemon answers: jobs completed per second is the pipeline's capacity, and waits grow
with the queue), and paced (submitted at --rate jobs/s: whether the provider keeps up
at that rate, and the waits it then has). Tasks run with isolation off (as the daemon's
user, no cgroup): the launch path itself; `--isolated` measures it with the shipped
defaults as root, and bench/isolation.py compares the two in one run.

Usage: python bench/core.py [--jobs 1000] [--sequential 200] [--requests 4000] [--rate 150]
                            [--only latency|throughput|footprint] [--isolated]
Prints a human summary, then JSON on the last line.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from sqlalchemy import insert

from gpuprovider.store import schema
from gpuprovider.store.store import Store
from gpuprovider.store.tasks import new_task_id
from gpuprovider.testing import Provider, free_port, kill_task_processes, make_home, wait_for

EIGHT_GPUS = '\n[[inventory.simulated_gpus]]\nmodel = "h100-80gb-sxm"\ncount = 8\n'
TRIVIAL = {"command": ["true"], "resources": {"gpu": 1}}
NEVER_FITS = {"command": ["true"], "resources": {"gpu": "H100:64"}}
DONE = {"succeeded", "failed", "cancelled"}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ms(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(pct(values, 50) * 1000, 2),
        "p99_ms": round(pct(values, 99) * 1000, 2),
        "max_ms": round(max(values) * 1000, 2),
    }


NO_ISOLATION = {"task_users": "none", "cgroups": "none", "devices": "none"}


def start_provider(
    root: Path, poll_interval_s: float = 0.1, task_users: str = "none", **isolation: str
) -> Provider:
    """A provider with the shipped defaults (poll interval included) and 8 simulated GPUs;
    tasks as the provider's user in cgroups of their own, unless `task_users` and other
    `[isolation]` keys (`cgroups="none"`, `devices="none"`) say otherwise."""
    port = free_port()
    home = make_home(
        root,
        port,
        EIGHT_GPUS,
        poll_interval_s=poll_interval_s,
        reaper_interval_s=5.0,
        task_users=task_users,
    )
    config = home.config.read_text()
    for key, value in isolation.items():
        config = re.sub(rf"(?m)^{key} = .*$", f'{key} = "{value}"', config)
    home.config.write_text(config)
    provider = Provider(home, port)
    provider.start()
    return provider


def all_tasks(provider: Provider) -> list[dict]:
    return provider.api.get("/tasks", params={"limit": 100000}).json()


def done_count(provider: Provider) -> int:
    """Tasks ended, from /health's counts: cheap to ask while the burst runs (listing
    every task each time would load the daemon the bench measures)."""
    counts = provider.api.get("/health").json()["tasks"]
    return sum(n for state, n in counts.items() if state in DONE)


# -- latency ------------------------------------------------------------------


def bare_popen_latency(runs: int) -> list[float]:
    """Baseline: fork+exec of the same trivial job, nothing else."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.Popen(["true"])
        samples.append(time.perf_counter() - start)
        proc.wait()
    return samples


def burst(provider: Provider, jobs: int, rate: float | None = None) -> dict:
    """`jobs` trivial jobs, back to back or at `rate` per second; their waits."""
    done_before = done_count(provider)
    start = time.time()
    for i in range(jobs):
        if rate:
            time.sleep(max(0.0, start + i / rate - time.time()))
        provider.submit(**TRIVIAL)
    submitted_s = time.time() - start
    wait_for(lambda: done_count(provider) >= done_before + jobs, 600, "the burst to end")
    tasks = [t for t in all_tasks(provider) if t["created_at"] >= start]
    waits = [t["started_at"] - t["created_at"] for t in tasks]
    last_end = max(t["finished_at"] for t in tasks)
    last_start = max(t["started_at"] for t in tasks)
    return {
        "jobs": jobs,
        **({"offered_per_s": rate} if rate else {}),
        "failed": sum(t["state"] != "succeeded" for t in tasks),
        "submit_s": round(submitted_s, 2),
        "completed_per_s": round(jobs / (last_end - start), 1),
        "placements_per_s": round(jobs / (last_start - start), 1),
        **ms(waits),
    }


def latency(root: Path, jobs: int, sequential: int, rate: float | None, **isolation: str) -> dict:
    """Submit->running waits: one job in flight, a burst back to back, and (with `rate`)
    a burst paced at that many jobs/s; `isolation` as start_provider takes it."""
    provider = start_provider(root, **isolation)
    try:
        # One job in flight: submit, wait for it to end, next (as peers.md measures).
        one_by_one = []
        for _ in range(sequential):
            task = provider.submit(**TRIVIAL)
            done = provider.wait_state(task["id"], DONE, timeout=30)
            one_by_one.append(done["started_at"] - done["created_at"])
        back_to_back = burst(provider, jobs)
        paced = burst(provider, jobs, rate) if rate else None
    finally:
        provider.stop()
        kill_task_processes(provider.home)
    return {
        "one_in_flight": {"jobs": sequential, **ms(one_by_one)},
        "burst": back_to_back,
        **({"burst_paced": paced} if paced else {}),
        "baseline_bare_popen": ms(bare_popen_latency(sequential)),
    }


# -- API throughput -------------------------------------------------------------


def _client(args: tuple[int, str, str, str, bytes | None, int]) -> tuple[int, int]:
    """One keep-alive connection sending `count` requests; (ok, errors)."""
    port, token, method, path, body, count = args
    conn = http.client.HTTPConnection("127.0.0.1", port)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    ok = errors = 0
    for _ in range(count):
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        if response.status < 400:
            ok += 1
        else:
            errors += 1
    conn.close()
    return ok, errors


def hammer(
    port: int, token: str, method: str, path: str, body: dict | None, total: int, clients: int
) -> dict:
    payload = json.dumps(body).encode() if body is not None else None
    per_client = total // clients
    with multiprocessing.Pool(clients) as pool:
        start = time.perf_counter()
        results = pool.map(_client, [(port, token, method, path, payload, per_client)] * clients)
        elapsed = time.perf_counter() - start
    ok = sum(r[0] for r in results)
    return {"requests": ok, "errors": sum(r[1] for r in results), "per_s": round(ok / elapsed, 1)}


BARE_APP = """
import sys, uvicorn
from fastapi import FastAPI, Request
app = FastAPI()
@app.post("/api/v1/tasks", status_code=201)
async def submit(request: Request):
    return await request.json()
@app.get("/api/v1/tasks")
async def tasks():
    return []
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            access_log=False, loop="uvloop", http="httptools")
"""


def throughput(root: Path, requests: int, clients: int) -> dict:
    provider = start_provider(root)
    try:
        submit = hammer(
            provider.port, provider.token, "POST", "/api/v1/tasks", NEVER_FITS, requests, clients
        )
        listing = hammer(
            provider.port,
            provider.token,
            "GET",
            "/api/v1/tasks?limit=100",
            None,
            requests // 4,
            clients,
        )
        queued = len(all_tasks(provider))
    finally:
        provider.stop()
    port = free_port()
    bare = subprocess.Popen([sys.executable, "-c", BARE_APP, str(port)])
    try:
        wait_for(lambda: _answers(port), what="the bare app")
        bare_submit = hammer(port, "-", "POST", "/api/v1/tasks", NEVER_FITS, requests, clients)
        bare_list = hammer(port, "-", "GET", "/api/v1/tasks", None, requests // 4, clients)
    finally:
        bare.terminate()
        bare.wait()
    return {
        "clients": clients,
        "submissions": {**submit, "stored": queued},
        "task_list_100": listing,
        "baseline_bare_uvicorn": {
            "post_per_s": bare_submit["per_s"],
            "get_per_s": bare_list["per_s"],
        },
    }


def _answers(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/api/v1/tasks")
        return conn.getresponse().status == 200
    except OSError:
        return False


# -- footprint ----------------------------------------------------------------


def idle_figures(provider: Provider, settle_s: float = 3.0, window_s: float = 10.0) -> dict:
    proc = psutil.Process(provider.proc.pid)
    time.sleep(settle_s)  # let start-up work finish before measuring idle
    before = proc.cpu_times()
    time.sleep(window_s)
    after = proc.cpu_times()
    busy = (after.user - before.user) + (after.system - before.system)
    return {
        "rss_mb": round(proc.memory_info().rss / 2**20, 1),
        "idle_cpu_pct": round(100 * busy / window_s, 2),
    }


def fill_finished(url: str, count: int) -> None:
    """`count` finished tasks with their journal rows, as a long-lived provider
    accumulates."""
    store = Store(url)
    now = time.time()
    tasks, events = [], []
    for i in range(count):
        task_id = new_task_id()
        tasks.append(
            {
                "id": task_id,
                "name": f"old-{i}",
                "live_name": None,
                "tenant": "admin",
                "kind": "job",
                "state": "succeeded",
                "state_reason": "exited with code 0",
                "spec": {"command": ["true"]},
                "priority": 0,
                "attempt": 1,
                "not_before": 0.0,
                "exit_code": 0,
                "created_at": now - count + i,
                "updated_at": now,
                "started_at": now,
                "finished_at": now,
                "version": 5,
            }
        )
        for src, dst in (
            (None, "submitted"),
            ("submitted", "queued"),
            ("queued", "scheduled"),
            ("scheduled", "starting"),
            ("starting", "running"),
            ("running", "succeeded"),
        ):
            events.append(
                {
                    "kind": "task",
                    "subject": task_id,
                    "tenant": "admin",
                    "at": now,
                    "from_state": src,
                    "to_state": dst,
                    "reason": "bench",
                }
            )
    with store.engine.begin() as conn:
        conn.execute(insert(schema.tasks), tasks)
        conn.execute(insert(schema.journal), events)
    store.close()


def footprint(root: Path, finished: int) -> dict:
    provider = start_provider(root)
    try:
        empty = idle_figures(provider)
    finally:
        provider.stop()
    fill_finished(provider.home.store_url(""), finished)
    provider.start()
    try:
        full = idle_figures(provider)
    finally:
        provider.stop()
    return {"empty_store": empty, f"with_{finished}_finished": full}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--sequential", type=int, default=200)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rate", type=float, default=150.0, help="jobs/s of the paced burst")
    parser.add_argument("--finished", type=int, default=10000)
    parser.add_argument(
        "--only", choices=("latency", "throughput", "footprint"), help="one part of the bench"
    )
    parser.add_argument(
        "--isolated",
        action="store_true",
        help="latency with the shipped defaults as root (pool users, cgroups, namespaces) "
        "rather than with isolation off; bench/isolation.py compares the two",
    )
    args = parser.parse_args()
    isolation = {"task_users": "auto"} if args.isolated else NO_ISOLATION
    parts = {
        "latency": lambda root: latency(root, args.jobs, args.sequential, args.rate, **isolation),
        "throughput": lambda root: throughput(root, args.requests, args.clients),
        "footprint": lambda root: footprint(root, args.finished),
    }
    with tempfile.TemporaryDirectory() as tmp:
        figures = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
        for name, part in parts.items():
            if args.only in (None, name):
                figures[name] = part(Path(tmp) / name)
    print(json.dumps(figures, indent=2))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
