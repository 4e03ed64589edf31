"""What isolating tasks costs on the launch path: submit->running waits (one job in
flight, p50/p99) and jobs/s (a burst back to back), with isolation off and on, in the
same run on the same machine.

  off: tasks run as the provider's user, in no cgroup, on the host's /dev
       (`users = "none"`, `cgroups = "none"`, `devices = "none"`): what 0.1.0 did.
  on:  a pool user per task, cgroups of its own with memory, CPU, pids and device
       limits (`users = "pool"`, `cgroups = "auto"`, `devices = "auto"`): the shipped
       defaults as root.
  ns:  as on, but kept to its GPUs by a /dev of its own in a mount namespace
       (`devices = "namespace"`): what a cgroup v2 machine gets.
  net: as on, with its ports kept to itself and the provider (`network =
       "isolated"`, the default since issue #26: nftables set elements per start);
       the other modes run with `network = "host"`.

Also the network rules alone, in this process: adding and removing an attempt's set
elements (`isolation/network.py` guard + release), p50/p99 over `--rule-rounds`.

Needs root (pool users, cgroups). The two modes alternate (`--rounds`) so that drift of
the machine falls on both.

Usage: python bench/isolation.py [--jobs 500] [--sequential 200] [--rounds 2]
                                 [--rule-rounds 2000] [--modes off,on,ns,net]
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

from gpuprovider.isolation import cgroups, network

sys.path.insert(0, str(Path(__file__).parent))
from core import latency, pct

MODES = {
    "off": {"task_users": "none", "cgroups": "none", "devices": "none", "network": "host"},
    "on": {"task_users": "pool", "cgroups": "auto", "devices": "auto", "network": "host"},
    "ns": {"task_users": "pool", "cgroups": "auto", "devices": "namespace", "network": "host"},
    "net": {"task_users": "pool", "cgroups": "auto", "devices": "auto", "network": "isolated"},
}
RULE_UID = 4_000_000_000  # no user's: the rules are added and taken away again at once


def rule_cost(rounds: int) -> dict:
    """What the network rules add to a start and to an end, alone (ms)."""
    why = network.ready()
    if why:
        return {"skipped": why}
    added, removed = [], []
    for i in range(rounds):
        ports = [40000 + i % 1000]
        start = time.perf_counter()
        network.guard(RULE_UID, ports, "isolated")
        added.append(time.perf_counter() - start)
        start = time.perf_counter()
        network.release(RULE_UID, ports, "isolated")
        removed.append(time.perf_counter() - start)
    return {
        "rounds": rounds,
        "guard_p50_ms": round(pct(added, 50) * 1000, 3),
        "guard_p99_ms": round(pct(added, 99) * 1000, 3),
        "release_p50_ms": round(pct(removed, 50) * 1000, 3),
        "release_p99_ms": round(pct(removed, 99) * 1000, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--sequential", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rule-rounds", type=int, default=2000)
    parser.add_argument("--modes", default=",".join(MODES), help="which, comma-separated")
    args = parser.parse_args()
    modes = {mode: MODES[mode] for mode in args.modes.split(",")}
    if os.geteuid() != 0:
        sys.exit("isolation needs root: run this bench as root")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="gpp-iso-") as tmp:
        for round_ in range(args.rounds):
            for mode, settings in modes.items():
                root = Path(tmp) / f"{mode}-{round_}"
                runs[mode].append(latency(root, args.jobs, args.sequential, None, **settings))
    result = {"cgroups": cgroups.found().version, "rounds": args.rounds}
    for mode, found in runs.items():
        result[mode] = {
            "one_in_flight_p50_ms": [r["one_in_flight"]["p50_ms"] for r in found],
            "one_in_flight_p99_ms": [r["one_in_flight"]["p99_ms"] for r in found],
            "burst_jobs_per_s": [r["burst"]["completed_per_s"] for r in found],
            "burst_p50_ms": [r["burst"]["p50_ms"] for r in found],
            "burst_failed": sum(r["burst"]["failed"] for r in found),
        }
        result[mode]["median_p50_ms"] = pct(result[mode]["one_in_flight_p50_ms"], 50)
        print(
            f"{mode:>3}: one in flight p50 {result[mode]['one_in_flight_p50_ms']} ms, "
            f"p99 {result[mode]['one_in_flight_p99_ms']} ms; burst "
            f"{result[mode]['burst_jobs_per_s']} jobs/s"
        )
    result["network_rules"] = rule_cost(args.rule_rounds)
    if "net" in modes and "on" in modes:
        result["net_minus_on_p50_ms"] = round(
            result["net"]["median_p50_ms"] - result["on"]["median_p50_ms"], 2
        )
    print(f"network rules alone: {result['network_rules']}")
    result["baseline_bare_popen"] = next(iter(runs.values()))[0]["baseline_bare_popen"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
