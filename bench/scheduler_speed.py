"""Scheduler speed on a synthetic 10,000-node cluster: placements per second and
decision latency per policy, for tasks shaped like the openb trace's.

Baseline in the same run: the cost of the pipeline without scoring (the
`first-fit` policy scores every node 0), so the figures show what each policy's
scorer adds on top of filtering and reserving.

Usage: python bench/scheduler_speed.py [--nodes 10000] [--tasks 5000]
Prints a table, then JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from gpuprovider.scheduler import POLICIES, Framework, GpuView, NodeView, Placement
from gpuprovider.scheduler.state import ClusterState
from openb import TRACES, load_tasks

MODELS = ("h100-80gb-sxm", "a100-80gb-sxm", "l40s-48gb", "rtx-4090-24gb")


def synthetic_nodes(count: int, seed: int = 7) -> list[NodeView]:
    rng = np.random.default_rng(seed)
    nodes = []
    for i in range(count):
        model = MODELS[int(rng.integers(len(MODELS)))]
        gpus = [GpuView(f"n{i}-{j}", j, model, 80) for j in range(8)]
        nodes.append(NodeView(f"n{i}", f"n{i}", 128_000, 1 << 20, gpus))
    return nodes


def run(policy: str, nodes: list[NodeView], tasks: list, trace: list) -> dict:
    state = ClusterState(nodes)
    framework = Framework(POLICIES[policy], typical=POLICIES[policy].typical_tasks(trace))
    latencies = []
    placed = 0
    start = time.perf_counter()
    for task in tasks:
        t0 = time.perf_counter()
        placed += isinstance(framework.decide(state, task), Placement)
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    return {
        "placed": placed,
        "placements_per_s": round(placed / elapsed, 1),
        "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 3),
        "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--tasks", type=int, default=5_000)
    parser.add_argument("--policies", default=",".join(POLICIES))
    args = parser.parse_args()
    trace = load_tasks(TRACES / "openb_pod_list_default.csv")
    rng = np.random.default_rng(1)
    tasks = [trace[int(i)] for i in rng.integers(len(trace), size=args.tasks)]
    nodes = synthetic_nodes(args.nodes)
    figures = {p: run(p, nodes, tasks, trace) for p in args.policies.split(",")}
    print(f"{args.nodes} nodes x 8 GPUs, {args.tasks} openb-shaped tasks")
    print(f"  {'policy':<12}{'placed/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for name, row in figures.items():
        print(f"  {name:<12}{row['placements_per_s']:>10}{row['p50_ms']:>9}{row['p99_ms']:>9}")
    print(json.dumps({"nodes": args.nodes, "tasks": args.tasks, "policies": figures}))


if __name__ == "__main__":
    main()
