"""Ray failure figures: failures injected into 4 local Ray nodes (every process on
127.0.0.1), each while a job runs there, counting attempts that ran in two places at
once, timing the node's detection and the job's re-queue, and the API's `/health`
latency throughout; a GCS outage (Ray's GCS fault tolerance, kept in the local Redis);
and a 256 MiB log read and followed through the API, against `cat` of the file.

Settings measured: `[backend] lease_s = 3`, `lease_grace_s = 1`; Ray health checks every
1 s, 3 misses (the README's). Each job writes a heartbeat line every 0.1 s into a file
of its attempt: two attempts ran at once if their heartbeats overlap.

Usage: python bench/ray_failures.py [--failures 20] [--outages 3] [--kinds partition,...]
Prints a human summary, then JSON on the last line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray process on 127.0.0.1
os.environ.setdefault("RAY_external_storage_namespace", f"gpp-bench-{uuid.uuid4().hex}")

from gpuprovider.backends.ray.common import node_labels
from gpuprovider.testing import (
    GPUPROVIDER,
    HEARTBEAT_JOB,
    Provider,
    concurrent_attempts,
    free_port,
    kill_task_processes,
    make_home,
    ray_cluster,
    ray_home,
    wait_for,
)

LEASE_S, GRACE_S = 3.0, 1.0
HEALTH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
KINDS = ("raylet_kill", "host_kill", "agent_kill", "partition", "ray_restart")
NODES = ("n0", "n1", "n2", "n3")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Prober(threading.Thread):
    """GET /health every 20 ms; what each took, while it runs."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.took, self.errors = url, [], 0
        self.stopping = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stopping.is_set():
                t0 = time.perf_counter()
                try:
                    client.get(self.url).raise_for_status()
                    self.took.append((time.perf_counter() - t0) * 1000)
                except httpx.HTTPError:
                    self.errors += 1
                time.sleep(0.02)

    def stop(self) -> dict:
        self.stopping.set()
        self.join()
        return {
            "requests": len(self.took),
            "errors": self.errors,
            "p50_ms": round(statistics.median(self.took), 2) if self.took else None,
            "p99_ms": round(pct(self.took, 0.99), 2) if self.took else None,
            "max_ms": round(max(self.took), 2) if self.took else None,
        }


class Fleet:
    """A Ray head (its GCS kept in the local Redis) and 4 gpuprovider nodes, with a
    provider using them."""

    def __init__(self, root: Path):
        self.cluster = ray_cluster(external_addresses=["127.0.0.1:6379"], _system_config=HEALTH)
        self.nodes: dict[str, object] = {}
        for name in NODES:
            self.add(name)
        self.cluster.wait_for_nodes()
        port = free_port()
        home = make_home(root, port, gpus="", poll_interval_s=0.1)
        ray_home(home, self.cluster.address, LEASE_S, GRACE_S)
        home.config.write_text(
            home.config.read_text().replace("log_max_mib = 64", "log_max_mib = 300")
        )
        self.provider = Provider(home, port)
        self.provider.start_timeout_s = 60
        self.provider.start()
        self.ids = wait_for(lambda: (ids := self.ready_ids()) and len(ids) == 4 and ids, 90)

    def add(self, name: str) -> None:
        self.nodes[name] = self.cluster.add_node(
            num_cpus=2,
            node_ip_address="127.0.0.1",
            labels=node_labels(name, [("h100-80gb-sxm", 1)], {}),
        )

    def drop(self, name: str, graceful: bool = False) -> None:
        node = self.nodes.pop(name)
        with contextlib.suppress(Exception):
            self.cluster.remove_node(node, allow_graceful=graceful)
        self.cluster.worker_nodes.discard(node)

    def ready_ids(self) -> dict[str, str]:
        nodes = self.provider.api.get("/nodes").json()
        return {n["name"]: n["id"] for n in nodes if n["status"] == "ready"}

    def raylet(self, name: str) -> psutil.Process:
        return psutil.Process(self.nodes[name].all_processes["raylet"][0].process.pid)

    def agents(self, name: str) -> list[psutil.Process]:
        found = []
        for child in self.raylet(name).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "NodeAgent" in " ".join(child.cmdline()):
                    found.append(child)
        return found

    def close(self) -> None:
        self.provider.stop()
        kill_task_processes(self.provider.home)
        self.cluster.shutdown()


def task_processes(task_id: str) -> list[psutil.Process]:
    """The task's processes and their runner: what dies with a host."""
    found = []
    for proc in psutil.process_iter(["environ"]):
        with contextlib.suppress(psutil.Error):
            if (proc.info["environ"] or {}).get("GPUPROVIDER_TASK_ID") == task_id:
                found += [proc, proc.parent()]
    return [p for p in found if p is not None]


def inject_once(fleet: Fleet, kind: str, root: Path) -> dict:
    p = fleet.provider
    marks = root / uuid.uuid4().hex
    marks.mkdir()
    task = p.submit(
        name=f"{kind}-{marks.name[:8]}",
        command=[sys.executable, "-c", HEARTBEAT_JOB, str(marks)],
        resources={"gpu": "H100:1"},
        retry={"attempts": 10, "backoff_s": 0},
    )
    first = p.wait_state(task["id"], "running", timeout=60)
    wait_for(lambda: (marks / str(first["attempt"])).exists(), 30)
    victim, victim_id = first["allocation"]["node"], first["allocation"]["node_id"]
    prober = Prober(p.url + "/api/v1/health")
    prober.start()
    t0 = time.time()
    stopped: list[psutil.Process] = []
    if kind in ("raylet_kill", "host_kill"):
        doomed = [*fleet.agents(victim), *task_processes(task["id"])] if kind == "host_kill" else []
        for proc in doomed:  # a dead host: its agent, runner and task go at once
            with contextlib.suppress(psutil.Error):
                proc.kill()
        fleet.drop(victim)
    elif kind == "agent_kill":
        for proc in fleet.agents(victim):
            proc.kill()
    elif kind == "partition":
        stopped = [fleet.raylet(victim), *fleet.agents(victim)]
        for proc in stopped:
            proc.send_signal(signal.SIGSTOP)
    elif kind == "ray_restart":
        fleet.drop(victim, graceful=True)
        fleet.add(victim)
    detected = requeued = None
    deadline = t0 + 60
    while time.time() < deadline and requeued is None:
        nodes = {n["name"]: n["status"] for n in p.api.get("/nodes").json()}
        if detected is None and nodes.get(victim) == "unreachable":
            detected = time.time() - t0
        now = p.task(task["id"])
        if now["attempt"] > first["attempt"] or now["state"] == "queued":
            requeued = time.time() - t0
        if kind in ("agent_kill", "ray_restart") and time.time() - t0 > LEASE_S + GRACE_S + 3:
            break  # the node came back in time: its attempt may have gone on
        if kind == "partition" and time.time() - t0 > LEASE_S + GRACE_S + 2 and stopped:
            for proc in stopped:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGCONT)
            stopped = []
        time.sleep(0.05)
    for proc in stopped:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGCONT)
    health = prober.stop()
    time.sleep(1.0)  # both attempts' beats, had both run
    double = len(concurrent_attempts(marks))
    # put the fleet back: the same nodes, as themselves
    if kind == "partition":
        with contextlib.suppress(psutil.Error):
            fleet.raylet(victim).wait(30)  # told it is dead, it exits on waking
        fleet.drop(victim)
        fleet.add(victim)
    elif kind in ("raylet_kill", "host_kill"):
        fleet.add(victim)
    back = wait_for(lambda: (ids := fleet.ready_ids()) and len(ids) == 4 and ids, 90)
    p.api.post(f"/tasks/{task['id']}/cancel")
    p.wait_state(task["id"], {"cancelled", "failed", "succeeded"}, timeout=60)
    return {
        "double_runs": double,
        "detected_s": round(detected, 2) if detected is not None else None,
        "requeued_s": round(requeued, 2) if requeued is not None else None,
        "same_identity": back.get(victim) == victim_id and back == fleet.ids,
        "health": health,
    }


def gcs_outage(fleet: Fleet, seconds: float = 8.0) -> dict:
    prober = Prober(fleet.provider.url + "/api/v1/health")
    prober.start()
    fleet.cluster.head_node.kill_gcs_server()
    time.sleep(seconds)
    fleet.cluster.head_node.start_gcs_server()
    health = prober.stop()
    wait_for(lambda: len(fleet.ready_ids()) == 4, 90, "the nodes after the outage")
    return health


def log_figures(fleet: Fleet, mib: int = 256) -> dict:
    """A task writes `mib` MiB; the API serves it in pages and as a followed stream."""
    p = fleet.provider
    script = (
        "import sys; line = b'x' * 1023 + b'\\n'; "
        f"[sys.stdout.buffer.write(line * 1024) for _ in range({mib})]"
    )
    task = p.submit(name="big-log", command=[sys.executable, "-c", script])
    ended = p.wait_state(task["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
    assert ended["state"] == "succeeded", ended["reason"]
    log = p.home.tasks / task["id"] / "output.log"  # every node is this machine
    daemon = psutil.Process(p.proc.pid)
    before = daemon.memory_full_info()
    peak = {"rss": before.rss, "uss": before.uss}
    watching = threading.Event()

    def sample() -> None:  # RSS counts the pages of Ray's object store it maps; USS not
        while not watching.is_set():
            now = daemon.memory_full_info()
            peak["rss"], peak["uss"] = max(peak["rss"], now.rss), max(peak["uss"], now.uss)
            time.sleep(0.1)

    threading.Thread(target=sample, daemon=True).start()
    env = {**os.environ, "GPUPROVIDER_HOME": str(p.home.root)}
    figures = {"mib": mib}
    for name, args in (("read", []), ("follow", ["--follow"])):
        t0 = time.perf_counter()
        with open(os.devnull, "wb") as sink:
            subprocess.run(
                [GPUPROVIDER, "task", "logs", task["id"], *args], stdout=sink, check=True, env=env
            )
        figures[f"{name}_s"] = round(time.perf_counter() - t0, 2)
    watching.set()
    figures["daemon_rss_growth_mib"] = round((peak["rss"] - before.rss) / 2**20, 1)
    figures["daemon_uss_growth_mib"] = round((peak["uss"] - before.uss) / 2**20, 1)
    if log.exists():
        t0 = time.perf_counter()
        with open(os.devnull, "wb") as sink:
            subprocess.run(["cat", str(log)], stdout=sink, check=True)
        figures["cat_s"] = round(time.perf_counter() - t0, 2)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--failures", type=int, default=20, help="injections of each kind")
    parser.add_argument("--outages", type=int, default=3)
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated; '' none")
    parser.add_argument("--log-mib", type=int, default=256)
    args = parser.parse_args()
    results: dict = {"settings": {"lease_s": LEASE_S, "lease_grace_s": GRACE_S, **HEALTH}}
    with tempfile.TemporaryDirectory() as tmp:
        fleet = Fleet(Path(tmp) / "provider")
        try:
            for kind in filter(None, args.kinds.split(",")):
                runs = [inject_once(fleet, kind, Path(tmp)) for _ in range(args.failures)]
                lat = [r["health"]["p99_ms"] for r in runs if r["health"]["p99_ms"] is not None]
                requeued = [r["requeued_s"] for r in runs if r["requeued_s"] is not None]
                detected = [r["detected_s"] for r in runs if r["detected_s"] is not None]
                results[kind] = {
                    "injected": len(runs),
                    "double_runs": sum(r["double_runs"] for r in runs),
                    "requeued": len(requeued),
                    "detected_s_p50_max": [pct(detected, 0.5), max(detected)] if detected else None,
                    "requeued_s_p50_max": [pct(requeued, 0.5), max(requeued)] if requeued else None,
                    "same_identity": sum(r["same_identity"] for r in runs),
                    "health_p99_ms_worst": max(lat) if lat else None,
                    "health_errors": sum(r["health"]["errors"] for r in runs),
                }
                print(kind, json.dumps(results[kind]), flush=True)
            if args.outages:
                outages = [gcs_outage(fleet) for _ in range(args.outages)]
                results["gcs_outage"] = {
                    "outages": len(outages),
                    "health_p99_ms_worst": max(o["p99_ms"] for o in outages),
                    "health_errors": sum(o["errors"] for o in outages),
                }
                print("gcs_outage", json.dumps(results["gcs_outage"]), flush=True)
            if args.log_mib:
                results["log"] = log_figures(fleet, args.log_mib)
                print("log", json.dumps(results["log"]), flush=True)
        finally:
            fleet.close()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
