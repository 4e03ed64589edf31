"""Replay the openb GPU traces (Alibaba, FGD paper, USENIX ATC'23) through the
scheduler library, the way the paper's simulator does, for every policy.

Replay (see ../shared/traces/openb/README.md):
  - cluster: the 1,213 GPU nodes; CPU, memory and GPUs enforced;
  - tasks sorted by name, shuffled with the seed, then tasks drawn uniformly with
    replacement appended until GPU requests would pass 130 % of capacity;
  - each task tried once on arrival, none ever leaves;
  - GPU allocation ratio read when arrived demand reaches 100 % (mean over the
    events whose arrived demand rounds to 100), fragmentation likewise.

Usage:
  python bench/openb.py                          # default trace, every policy, seeds 42-51
  python bench/openb.py --traces all --seeds 42  # every trace in the folder, one seed
Prints a table per trace, then JSON on the last line.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from gpuprovider.domain.resources import MILLI, GpuRequest
from gpuprovider.scheduler import POLICIES, Framework, GpuView, NodeView, Placement, TaskRequest
from gpuprovider.scheduler.fragmentation import FragTracker, TypicalTasks
from gpuprovider.scheduler.state import ClusterState

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces" / "openb"
INFLATION = 1.3
# The paper's own names for the policies compared (published/analysis_*.csv).
PUBLISHED_NAMES = {
    "random": "01-Random",
    "best-fit": "05-BestFit",
    "fgd": "06-FGD",
}


def load_nodes(folder: Path) -> list[NodeView]:
    nodes = []
    with open(folder / "openb_node_list_gpu_node.csv") as handle:
        for row in csv.DictReader(handle):
            gpus = [GpuView(f"{row['sn']}-{j}", j, row["model"], 0) for j in range(int(row["gpu"]))]
            nodes.append(
                NodeView(row["sn"], row["sn"], int(row["cpu_milli"]), int(row["memory_mib"]), gpus)
            )
    return nodes


def load_tasks(path: Path) -> list[TaskRequest]:
    tasks = []
    with open(path) as handle:
        for row in csv.DictReader(handle):
            count, milli = int(row["num_gpu"]), int(row["gpu_milli"])
            spec = row.get("gpu_spec", "")
            models = frozenset(spec.split("|")) if spec else None
            if count == 0 or milli == 0:
                gpu = GpuRequest()
            elif milli < MILLI:
                gpu = GpuRequest(share_milli=milli, models=models, model_text=spec)
            else:
                gpu = GpuRequest(count=count, models=models, model_text=spec)
            tasks.append(
                TaskRequest(row["name"], gpu, int(row["cpu_milli"]), int(row["memory_mib"]))
            )
    tasks.sort(key=lambda t: t.task_id)
    return tasks


def gpu_milli(task: TaskRequest) -> int:
    return task.gpu.milli_per_gpu * task.gpu.gpus_touched if task.gpu.wants_gpu else 0


def arrivals(tasks: list[TaskRequest], capacity: int, seed: int) -> list[TaskRequest]:
    """Shuffled by seed, then extended with uniform draws, up to the task whose GPU
    request would take arrived demand past 130 % of capacity."""
    rng = np.random.default_rng(seed)
    stream = []
    total = 0
    for task in (tasks[i] for i in rng.permutation(len(tasks))):
        if total + gpu_milli(task) > INFLATION * capacity:
            return stream
        stream.append(task)
        total += gpu_milli(task)
    while True:
        extra = tasks[int(rng.integers(len(tasks)))]
        if total + gpu_milli(extra) > INFLATION * capacity:
            return stream
        stream.append(extra)
        total += gpu_milli(extra)


def replay(trace: str, policy_name: str, seed: int) -> dict:
    nodes = load_nodes(TRACES)
    tasks = load_tasks(TRACES / f"openb_pod_list_{trace}.csv")
    policy = POLICIES[policy_name]
    state = ClusterState(nodes)
    framework = Framework(policy, typical=policy.typical_tasks(tasks), seed=seed)
    # Fragmentation is reported as the paper defines it, whatever the policy plans for.
    measure = FragTracker(TypicalTasks.from_tasks(tasks).bind(state), state)
    capacity = state.capacity_milli
    stream = arrivals(tasks, capacity, seed)
    arrived = 0
    alloc_by_bin: dict[int, list[float]] = defaultdict(list)
    frag_by_bin: dict[int, list[float]] = defaultdict(list)
    decision_s: list[float] = []
    placed = 0
    started = time.perf_counter()
    for task in stream:
        t0 = time.perf_counter()
        decision = framework.decide(state, task)
        decision_s.append(time.perf_counter() - t0)
        placed += isinstance(decision, Placement)
        arrived += gpu_milli(task)
        level = round(100 * arrived / capacity)
        alloc_by_bin[level].append(100 * state.allocated_milli / capacity)
        if level in (0, 100) or level % 10 == 0:
            frag_by_bin[level].append(100 * measure.total_frag() / capacity)
    wall_s = time.perf_counter() - started
    return {
        "trace": trace,
        "policy": policy_name,
        "seed": seed,
        "tasks": len(stream),
        "placed": placed,
        "wall_s": round(wall_s, 2),
        "alloc": {k: statistics.fmean(v) for k, v in sorted(alloc_by_bin.items())},
        "frag": {k: statistics.fmean(v) for k, v in sorted(frag_by_bin.items())},
        "decision_p50_ms": round(1000 * float(np.percentile(decision_s, 50)), 3),
        "decision_p99_ms": round(1000 * float(np.percentile(decision_s, 99)), 3),
    }


def published(trace: str) -> dict[str, float]:
    """The paper authors' allocation at 100 % arrived demand, mean of seeds 42-51."""
    by_policy: dict[str, list[float]] = defaultdict(list)
    with open(TRACES / "published" / "analysis_allo_discrete.csv") as handle:
        for row in csv.DictReader(handle):
            if row["workload"] == f"openb_pod_list_{trace}":
                by_policy[row["sc_policy"]].append(float(row["100"]))
    return {name: statistics.fmean(v) for name, v in by_policy.items()}


def all_traces() -> list[str]:
    return sorted(
        p.stem.removeprefix("openb_pod_list_") for p in TRACES.glob("openb_pod_list_*.csv")
    )


def _run(args: tuple[str, str, int]) -> dict:
    return replay(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", default="default", help="comma-separated, or 'all'")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--seeds", default="42-51", help="e.g. 42-51 or 42")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    traces = all_traces() if args.traces == "all" else args.traces.split(",")
    lo, _, hi = args.seeds.partition("-")
    seeds = list(range(int(lo), int(hi or lo) + 1))
    jobs = [(t, p, s) for t in traces for p in args.policies.split(",") for s in seeds]
    with multiprocessing.Pool(args.workers) as pool:
        runs = pool.map(_run, jobs, chunksize=1)

    summary: dict[str, dict] = {}
    for trace in traces:
        paper = published(trace)
        rows = {}
        for name in args.policies.split(","):
            mine = [r for r in runs if r["trace"] == trace and r["policy"] == name]
            levels = sorted(set.intersection(*(set(r["alloc"]) for r in mine)))
            rows[name] = {
                "alloc_by_demand": {
                    lv: round(statistics.fmean(r["alloc"][lv] for r in mine), 2) for lv in levels
                },
                "frag_by_demand": {
                    lv: round(statistics.fmean(r["frag"][lv] for r in mine), 2)
                    for lv in sorted(set.intersection(*(set(r["frag"]) for r in mine)))
                },
                "alloc_at_100": round(statistics.fmean(r["alloc"][100] for r in mine), 2),
                "frag_at_100": round(statistics.fmean(r["frag"][100] for r in mine), 2),
                "wall_s": round(statistics.fmean(r["wall_s"] for r in mine), 2),
                "decision_p50_ms": round(statistics.fmean(r["decision_p50_ms"] for r in mine), 3),
                "decision_p99_ms": round(statistics.fmean(r["decision_p99_ms"] for r in mine), 3),
                "seeds": len(mine),
            }
            if name in PUBLISHED_NAMES and PUBLISHED_NAMES[name] in paper:
                rows[name]["published_alloc_at_100"] = round(paper[PUBLISHED_NAMES[name]], 2)
        summary[trace] = rows
        print(f"\n{trace}  (seeds {args.seeds}; GPU allocation % by arrived demand %)")
        curve = (50, 70, 80, 90, 100, 110, 120, 130)
        print(
            f"  {'policy':<10}"
            + "".join(f"{lv:>7}" for lv in curve)
            + f"{'paper@100':>10}{'frag@100':>9}{'wall s':>8}{'p99 ms':>8}"
        )
        for name, row in rows.items():
            paper_value = row.get("published_alloc_at_100", "")
            points = "".join(f"{row['alloc_by_demand'].get(lv, ''):>7}" for lv in curve)
            print(
                f"  {name:<10}{points}{paper_value:>10}{row['frag_at_100']:>9}"
                f"{row['wall_s']:>8}{row['decision_p99_ms']:>8}"
            )
    if "fgd" in args.policies.split(",") and len(traces) > 1:
        print(f"\nagainst FGD at 100 % arrived demand, over {len(traces)} traces:")
        for name in args.policies.split(","):
            if name != "fgd":
                gains = [
                    rows[name]["alloc_at_100"] - rows["fgd"]["alloc_at_100"]
                    for rows in summary.values()
                ]
                above = sum(g > 0 for g in gains)
                print(
                    f"  {name:<10} above on {above}, below on {sum(g < 0 for g in gains)}; "
                    f"gain {min(gains):+.2f} to {max(gains):+.2f} points"
                )
    print(json.dumps({"seeds": args.seeds, "traces": summary}))


if __name__ == "__main__":
    main()
