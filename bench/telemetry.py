"""Watch and repair, measured on a real daemon with a stand-in NVML (the driver's
functions, scripted values) and a kernel log file in the driver's XID format.

  scrape:    GET /metrics with 64 GPUs, empty store, then with 10,000 tasks stored
             (queued for a node that does not exist: they stay), p50/p99 over N scrapes.
  cost:      the daemon's CPU over a minute with telemetry on (8 GPUs, NVML every
             10 s, the kernel log every second) beside the same daemon with no GPUs
             to read and no kernel log: the same loops, nothing to do.
  detection: an XID 48 line -> its GPU cordoned and the task on it stopped; an ECC
             rise -> cordoned, at the shipped 10 s poll (goal: two polls).
  benign:    10,000 benign XID lines (13, 31, 43, 45, 63, 94) -> cordons (goal 0).

Usage: python bench/telemetry.py [--scrapes 50] [--tasks 10000] [--cost-s 60]
Prints a human summary, then JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

from gpuprovider.testing import (
    Provider,
    StandinGpus,
    free_port,
    kill_task_processes,
    make_home,
    wait_for,
    watch_home,
)

sys.path.insert(0, str(Path(__file__).parent))
from core import ms

BENIGN = (13, 31, 43, 45, 63, 94)


def started(root: Path, gpus: int, interval_s: float, kernel_log: bool = True) -> tuple:
    port = free_port()
    home = make_home(root / "home", port, gpus="")
    log = root / "kern.log"
    log.write_text("")
    watch_home(home, log if kernel_log else "", interval_s=interval_s)
    standin = StandinGpus(root / "nvml.json", gpus)
    provider = Provider(home, port)
    provider.env = standin.env
    provider.start_timeout_s = 60
    provider.start()
    return provider, standin, log


def scrape_times(provider: Provider, n: int) -> list[float]:
    headers = {"Authorization": f"Bearer {provider.token}"}
    with httpx.Client(headers=headers, timeout=30) as client:
        client.get(provider.url + "/metrics")  # warm
        times = []
        for _ in range(n):
            began = time.perf_counter()
            assert client.get(provider.url + "/metrics").status_code == 200
            times.append(time.perf_counter() - began)
    return times


def scrape(root: Path, scrapes: int, tasks: int) -> dict:
    provider, _, _ = started(root, 64, 10.0)
    try:
        wait_for(lambda: "gpuprovider_gpu_utilization_ratio" in _text(provider), 30, "samples")
        empty = scrape_times(provider, scrapes)
        spec = {"command": ["true"], "node_selector": {"bench": "nowhere"}}
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: provider.submit(**spec), range(tasks)))
        full = scrape_times(provider, scrapes)
        size = len(_text(provider))
    finally:
        provider.stop()
    return {"gpus": 64, "tasks": tasks, "empty": ms(empty), "full": ms(full), "bytes": size}


def _text(provider: Provider) -> str:
    headers = {"Authorization": f"Bearer {provider.token}"}
    return httpx.get(provider.url + "/metrics", headers=headers, timeout=30).text


def cpu_share(provider: Provider, seconds: float) -> float:
    proc = psutil.Process(provider.proc.pid)
    time.sleep(5)  # past start-up
    before, began = proc.cpu_times(), time.monotonic()
    time.sleep(seconds)
    after, took = proc.cpu_times(), time.monotonic() - began
    return round(100 * (after.user + after.system - before.user - before.system) / took, 3)


def cost(root: Path, seconds: float) -> dict:
    shares = {}
    for mode, gpus, kernel_log in (("off", 0, False), ("on", 8, True)):
        provider, _, _ = started(root / mode, gpus, 10.0, kernel_log)
        try:
            shares[mode] = cpu_share(provider, seconds)
        finally:
            provider.stop()
    return {"gpus": 8, "interval_s": 10.0, "seconds": seconds, "cpu_pct_of_a_core": shares}


def _gpu(provider: Provider, uuid: str) -> dict:
    return next(g for g in provider.api.get("/gpus").json() if g["uuid"] == uuid)


def detection(root: Path) -> dict:
    provider, standin, log = started(root, 8, 10.0)  # the breaker allows 2 cordons
    try:
        task = provider.submit(command=["sleep", "600"], resources={"gpu": "1"})
        running = provider.wait_state(task["id"], "running")
        uuid = running["allocation"]["gpus"][0]["uuid"]
        index = next(i for i, g in enumerate(standin.gpus) if g["uuid"] == uuid)
        time.sleep(1.5)  # the kernel log reader is open
        began = time.monotonic()
        with log.open("a") as f:
            f.write(standin.kernel_line(index, 48, "DBE (double bit error)"))
        wait_for(lambda: _gpu(provider, uuid)["cordon_reason"], 30, "the XID 48 cordon")
        cordoned = time.monotonic() - began

        def left_gpu() -> bool:
            now = provider.task(task["id"])
            return now["state"] != "running" or uuid not in [
                g["uuid"] for g in now["allocation"]["gpus"]
            ]

        wait_for(left_gpu, 30, "the task to leave the GPU")
        stopped = time.monotonic() - began
        other = (index + 1) % len(standin.gpus)
        began = time.monotonic()
        standin.set(other, ecc={"uncorrected_volatile": 1})
        other_uuid = standin.gpus[other]["uuid"]
        wait_for(lambda: _gpu(provider, other_uuid)["cordon_reason"], 60, "the ECC cordon")
        ecc = time.monotonic() - began
    finally:
        provider.stop()
        kill_task_processes(provider.home)
    return {
        "xid48_to_cordon_s": round(cordoned, 2),
        "xid48_to_task_stopped_s": round(stopped, 2),
        "ecc_rise_to_cordon_s": round(ecc, 2),
        "poll_interval_s": 10.0,
    }


def benign(root: Path, lines: int) -> dict:
    provider, standin, log = started(root, 8, 10.0)
    try:
        time.sleep(1.5)
        with log.open("a") as f:
            for i in range(lines):
                f.write(standin.kernel_line(i % 8, BENIGN[i % len(BENIGN)], "benign"))

        def counted() -> int:
            total = 0
            for line in _text(provider).splitlines():
                if line.startswith("gpuprovider_gpu_xid_errors_total{"):
                    total += int(float(line.rsplit(" ", 1)[1]))
            return total if total >= lines else 0

        seen = wait_for(counted, 60, "every line read")
        cordons = [g for g in provider.api.get("/gpus").json() if g["cordon_reason"]]
        repairs = provider.api.get("/repairs").json()
    finally:
        provider.stop()
    return {
        "lines": lines,
        "xids_read": seen,
        "cordons": len(cordons),
        "repair_events": len(repairs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scrapes", type=int, default=50)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--cost-s", type=float, default=60.0)
    parser.add_argument("--benign", type=int, default=10_000)
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    with tempfile.TemporaryDirectory(prefix="gpp-telemetry-") as tmp:
        root = Path(tmp)
        result = {
            "scrape": scrape(root / "scrape", args.scrapes, args.tasks),
            "cost": cost(root / "cost", args.cost_s),
            "detection": detection(root / "detection"),
            "benign": benign(root / "benign", args.benign),
        }
    s, c, d, b = result["scrape"], result["cost"], result["detection"], result["benign"]
    print(
        f"/metrics, 64 GPUs: empty store p50 {s['empty']['p50_ms']} ms p99 "
        f"{s['empty']['p99_ms']} ms; {s['tasks']} tasks p50 {s['full']['p50_ms']} ms p99 "
        f"{s['full']['p99_ms']} ms ({s['bytes']} bytes)"
    )
    print(f"daemon CPU, % of a core: {c['cpu_pct_of_a_core']}")
    print(
        f"XID 48 -> cordon {d['xid48_to_cordon_s']} s, task stopped {d['xid48_to_task_stopped_s']}"
        f" s; ECC rise -> cordon {d['ecc_rise_to_cordon_s']} s (poll {d['poll_interval_s']} s)"
    )
    print(f"{b['lines']} benign XID lines: {b['xids_read']} read, {b['cordons']} cordons")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
