"""Ray backend figures: throughput and latency over 4 local Ray nodes against the local
backend in the same run, dead-node detection, the head's overhead per Ray node, and the
API's latency while many tasks run on Ray (against none running).

Every Ray process listens on 127.0.0.1 (Ray's multi-node-on-one-machine tool, as the
tests use it). Both providers get 8 simulated H100s: 4 Ray nodes x 2, or one local node
x 8; jobs are `true` asking for one GPU. The "roomy" bursts give each provider 512
GPUs, so that no job waits for one, back to back and paced at `--rate`. Dead nodes are
timed with the default lease and with the README's fast-failover lease.

Usage: python bench/ray_backend.py [--jobs 500] [--deaths 3] [--running 200] [--rate 60]
                                   [--only bursts|roomy|running|deaths]
Prints a human summary, then JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray process on 127.0.0.1

from ray.cluster_utils import Cluster

from gpuprovider.backends.ray.common import node_labels
from gpuprovider.testing import (
    Provider,
    free_port,
    kill_task_processes,
    make_home,
    ray_home,
    wait_for,
)

sys.path.insert(0, str(Path(__file__).parent))
from core import EIGHT_GPUS, all_tasks, burst, ms

HEALTH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


# Enough GPUs for a whole burst (4 nodes x 128, or one local node x 512: a simulated
# model is at most 64 to a node): submit -> running is then the provider's own latency,
# not time queued for a GPU.
ROOMY = [("h100-80gb-sxm", 64), ("a100-80gb-sxm", 64)]
MODELS_8 = ["h200-141gb-sxm", "h200-141gb-nvl", "h100-80gb-sxm", "h100-80gb-pcie"]
MODELS_8 += ["h100-94gb-nvl", "a100-40gb-sxm", "a100-80gb-sxm", "a100-40gb-pcie"]


def cluster_with(
    nodes: int, gpus_each: int = 2, models: list[tuple[str, int]] | None = None
) -> tuple[Cluster, list]:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
            "_system_config": HEALTH,
        },
    )
    added = [
        cluster.add_node(
            num_cpus=2,
            node_ip_address="127.0.0.1",
            labels=node_labels(f"node-{i}", models or [("h100-80gb-sxm", gpus_each)], {}),
        )
        for i in range(nodes)
    ]
    cluster.wait_for_nodes()
    return cluster, added


def provider_for(
    root: Path,
    address: str | None,
    gpus_expected: int = 8,
    local_gpus: str = EIGHT_GPUS,
    lease: tuple[float, float] | None = None,
) -> Provider:
    """A provider on the local backend, or on the Ray cluster at `address`; `lease`:
    ([backend] lease_s, lease_grace_s) other than the defaults."""
    port = free_port()
    gpus = "" if address else local_gpus
    home = make_home(root, port, gpus, poll_interval_s=0.1, reaper_interval_s=5.0)
    if address:
        ray_home(home, address, *(lease or (None, None)))
    provider = Provider(home, port)
    provider.start()
    wait_for(lambda: len(provider.api.get("/gpus").json()) == gpus_expected, 60, "the GPUs")
    return provider


def eight_gpu_bursts(root: Path, jobs: int) -> dict:
    """The burst on 8 GPUs (most jobs wait for one): Ray over 4 nodes of 2 against one
    local node of 8; and the Ray provider's footprint, idle, before it."""
    local = provider_for(root / "local", None)
    try:
        local_burst = burst(local, jobs)
    finally:
        local.stop()
    cluster, _ = cluster_with(4)
    ray = provider_for(root / "ray4", cluster.address)
    try:
        idle = footprint(ray.proc.pid)
        ray_burst = burst(ray, jobs)
    finally:
        ray.stop()
        kill_task_processes(ray.home)
        cluster.shutdown()
    return {"ray_4_nodes": ray_burst, "local_baseline": local_burst, "ray_head_idle": idle}


def roomy_bursts(root: Path, jobs: int, rate: float) -> dict:
    """The same burst where every job finds a free GPU at once, back to back and paced at
    `rate` jobs/s: Ray over 4 nodes of 128 GPUs against one local node of 512."""
    gpus = 4 * sum(n for _, n in ROOMY)
    local_gpus = "".join(
        f'\n[[inventory.simulated_gpus]]\nmodel = "{model}"\ncount = 64\n' for model in MODELS_8
    )
    local = provider_for(root / "local-roomy", None, gpus, local_gpus)
    try:
        local_bursts = [burst(local, jobs), burst(local, jobs, rate)]
    finally:
        local.stop()
    cluster, _ = cluster_with(4, models=ROOMY)
    ray = provider_for(root / "ray-roomy", cluster.address, gpus)
    try:
        ray_bursts = [burst(ray, jobs), burst(ray, jobs, rate)]
    finally:
        ray.stop()
        kill_task_processes(ray.home)
        cluster.shutdown()
    return {
        "gpus": gpus,
        "back_to_back": {"ray_4_nodes": ray_bursts[0], "local_baseline": local_bursts[0]},
        "paced": {"ray_4_nodes": ray_bursts[1], "local_baseline": local_bursts[1]},
    }


def api_latency(provider: Provider, requests: int = 300) -> dict:
    """GET /health back to back: what the executor's passes cost the API."""
    took = []
    for _ in range(requests):
        t0 = time.perf_counter()
        provider.api.get("/health").raise_for_status()
        took.append(time.perf_counter() - t0)
    return ms(took)


def api_with_running(root: Path, running: int) -> dict:
    """API latency with no task, then with `running` tasks running on 4 Ray nodes."""
    cluster, _ = cluster_with(4, gpus_each=-(-running // 4))
    provider = provider_for(root, cluster.address, gpus_expected=4 * -(-running // 4))
    try:
        idle = api_latency(provider)
        for _ in range(running):
            provider.submit(command=["sleep", "600"], resources={"gpu": 1})
        wait_for(
            lambda: sum(t["state"] == "running" for t in all_tasks(provider)) >= running,
            300,
            "every task running",
        )
        busy = api_latency(provider)
    finally:
        provider.stop()
        kill_task_processes(provider.home)
        cluster.shutdown()
    return {"running": running, "idle": idle, "busy": busy}


def describe_loaded(loaded: dict) -> str:
    busy, idle = loaded["busy"], loaded["idle"]
    return (
        f"API /health with {loaded['running']} tasks running on Ray: p50 {busy['p50_ms']} ms, "
        f"p99 {busy['p99_ms']} ms (none running: p50 {idle['p50_ms']} ms, "
        f"p99 {idle['p99_ms']} ms)"
    )


def describe_roomy(roomy: dict) -> str:
    lines = [f"bursts with a GPU free for every job ({roomy['gpus']} GPUs): submit -> running"]
    for kind in ("back_to_back", "paced"):
        for name, got in roomy[kind].items():
            offered = f" of {got['offered_per_s']}/s" if "offered_per_s" in got else ""
            lines.append(
                f"  {kind}{offered} {name}: p50 {got['p50_ms']} ms, p99 {got['p99_ms']} ms, "
                f"{got['placements_per_s']} placements/s (submitted in {got['submit_s']} s)"
            )
    return "\n".join(lines)


def footprint(pid: int, seconds: float = 10.0) -> dict:
    proc = psutil.Process(pid)
    proc.cpu_percent(None)
    time.sleep(seconds)
    return {
        "rss_mb": round(proc.memory_info().rss / 2**20, 1),
        "cpu_pct": round(proc.cpu_percent(None), 2),
    }


# The README's settings for fast failover; the defaults are (7, 2).
FAST_LEASE = (3.0, 1.0)


def deaths(root: Path, runs: int, lease: tuple[float, float] | None = None) -> list[float]:
    """Seconds from a node's death to its job re-queued, `runs` times."""
    cluster, nodes = cluster_with(runs + 1)
    provider = provider_for(root, cluster.address, gpus_expected=2 * (runs + 1), lease=lease)
    by_name = {f"node-{i}": node for i, node in enumerate(nodes)}
    found = []
    try:
        for _ in range(runs):
            task = provider.submit(
                command=["sleep", "300"],
                resources={"gpu": 1},
                retry={"attempts": 5, "backoff_s": 0},
            )
            running = provider.wait_state(task["id"], "running", timeout=60)
            victim = running["allocation"]["node"]
            died = time.time()
            cluster.remove_node(by_name.pop(victim), allow_graceful=False)
            requeued = wait_for(
                lambda t=task: [
                    e
                    for e in provider.task(t["id"])["events"]
                    if e["to"] == "queued" and "attempt 2" in e["reason"]
                ],
                60,
            )
            found.append(round(requeued[0]["at"] - died, 2))
            provider.api.post(f"/tasks/{task['id']}/cancel")
    finally:
        provider.stop()
        kill_task_processes(provider.home)
        cluster.shutdown()
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--deaths", type=int, default=3)
    parser.add_argument("--running", type=int, default=200)
    parser.add_argument("--rate", type=float, default=60.0, help="the paced burst's jobs/s")
    phases = ["bursts", "roomy", "running", "deaths"]
    parser.add_argument("--only", choices=phases, help="one phase only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.only:
            only = {
                "bursts": lambda: eight_gpu_bursts(root, args.jobs),
                "roomy": lambda: roomy_bursts(root, args.jobs, args.rate),
                "running": lambda: api_with_running(root, args.running),
                "deaths": lambda: {
                    "defaults": deaths(root / "defaults", args.deaths),
                    "fast": deaths(root / "fast", args.deaths, FAST_LEASE),
                },
            }[args.only]()
            print(json.dumps({args.only: only}))
            return
        roomy = roomy_bursts(root / "roomy", args.jobs, args.rate)
        loaded = api_with_running(root / "running", args.running)
        cluster, _ = cluster_with(1)
        one = provider_for(root / "ray1", cluster.address, gpus_expected=2)
        one_node = footprint(one.proc.pid)
        one.stop()
        cluster.shutdown()
        eight = eight_gpu_bursts(root / "eight", args.jobs)
        ray_burst, local_burst = eight["ray_4_nodes"], eight["local_baseline"]
        four_nodes = eight["ray_head_idle"]
        detection = deaths(root / "deaths", args.deaths)
        fast_detection = deaths(root / "fast-deaths", args.deaths, FAST_LEASE)
    per_node = {
        "rss_mb": round((four_nodes["rss_mb"] - one_node["rss_mb"]) / 3, 1),
        "cpu_pct": round((four_nodes["cpu_pct"] - one_node["cpu_pct"]) / 3, 2),
    }
    figures = {
        "ray_4_nodes": ray_burst,
        "local_baseline": local_burst,
        "dead_node_to_requeued_s": {"defaults": detection, "lease_3_grace_1": fast_detection},
        "head_idle": {"1_node": one_node, "4_nodes": four_nodes, "per_extra_node": per_node},
        "api_with_running": loaded,
        "roomy": roomy,
    }
    print(f"{args.jobs} jobs, 8 GPUs: Ray over 4 nodes vs the local backend")
    for name, got in (("ray, 4 nodes", ray_burst), ("local", local_burst)):
        print(
            f"  {name:13s} {got['placements_per_s']:7.1f} placements/s  "
            f"p50 {got['p50_ms']:8.1f} ms  p99 {got['p99_ms']:8.1f} ms  failed {got['failed']}"
        )
    print(
        f"dead node -> job re-queued: {detection} s with the default lease, {fast_detection} s "
        "with lease_s = 3, lease_grace_s = 1 (goal < 10 s)"
    )
    print(f"head idle: 1 node {one_node}, 4 nodes {four_nodes}, per extra node {per_node}")
    print(describe_loaded(loaded))
    print(describe_roomy(roomy))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
