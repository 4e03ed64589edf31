"""Earnings strategies head to head on the simulated markets (`gpuprovider.market.sim`):
every strategy on scenario A (lease market from the openb pods) and B (inference-app
market from the Azure LLM traces), seeds 1-10 by default, mean and spread.

Usage:
  python bench/market.py                       # seeds 1-10, both scenarios, a day each
  python bench/market.py --seeds 3 --scenarios A --hours 6
  python bench/market.py --speed               # also: one day of a 1,008-GPU fleet
Seeds are the only thing that changes between runs. Prints a table per scenario, the
strategy's gains over each baseline, then JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time

from gpuprovider.market.sim import report
from gpuprovider.market.sim.run import BASELINES, Scenario, names, simulate

SHOWN = {
    Scenario.A: (
        "net_revenue_per_gpu_hour",
        "utilisation",
        "win_rate",
        "mean_price_over_reference",
        "refused_fragmentation",
        "regret",
        "hindsight_net_per_gpu_hour",
        "hindsight_whole_node_share",
    ),
    Scenario.B: (
        "score_share_per_dollar",
        "score_share",
        "compute_units_per_gpu_hour",
        "cold_starts",
        "preemptions",
        "scale_downs",
        "unique_apps",
    ),
}
HEADLINE = {Scenario.A: "net_revenue_per_gpu_hour", Scenario.B: "score_share_per_dollar"}
OURS = "earnings"


def seeds_of(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    first, last = int(lo), int(hi or lo)
    if last < first:
        raise SystemExit(f"--seeds {text}: the range ends before it starts")
    return list(range(first, last + 1))


def _job(args: tuple[str, int, float | None, int]) -> dict:
    scenario, seed, hours, scale = args
    result = simulate(Scenario(scenario), seed, names(Scenario(scenario)), hours, scale)
    return report.plain(result)


def spread(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if v is not None]
    if not finite:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(finite),
        "sd": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "min": min(finite),
        "max": max(finite),
        "n": len(finite),
    }


def speed(scale: int) -> dict:
    """One simulated day of scenario A with a fleet `scale` times the default (9: 1,008
    GPUs for this provider, 4,032 in the market), earnings beside swan-default on the
    same market, in this process: wall and CPU seconds (the machine is shared: CPU time
    is what the simulation itself took)."""
    started, cpu = time.perf_counter(), time.process_time()
    result = simulate(Scenario.A, 1, ["swan-default", OURS], 24, scale)
    total = {"wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu}
    runs = {
        n: {k: r["metrics"][k] for k in ("wall_s", "cpu_s")}
        for n, r in result["strategies"].items()
    }
    return {"fleet_gpus": 112 * scale, "hours": 24, "total": total, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1-10", help="a range (1-10) or one seed")
    parser.add_argument("--scenarios", default="A,B")
    parser.add_argument("--hours", type=float, default=None, help="simulated hours (24)")
    parser.add_argument("--fleet-scale", type=int, default=1)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--speed", action="store_true", help="time a 1,008-GPU day too")
    parser.add_argument("--speed-scale", type=int, default=9)
    args = parser.parse_args()
    seeds = seeds_of(args.seeds)
    scenarios = [Scenario(s.strip().upper()) for s in args.scenarios.split(",")]
    jobs = [(str(sc), seed, args.hours, args.fleet_scale) for sc in scenarios for seed in seeds]
    started = time.perf_counter()
    with multiprocessing.Pool(min(args.workers, len(jobs))) as pool:
        results = pool.map(_job, jobs, chunksize=1)
    wall = time.perf_counter() - started
    summary: dict = {"seeds": args.seeds, "hours": args.hours or 24, "wall_s": round(wall, 1)}
    gains: dict = {}
    for sc in scenarios:
        mine = [r for r in results if r["scenario"] == str(sc)]
        table: dict = {}
        for name in names(sc):
            metrics = sorted({m for r in mine for m in r["strategies"][name]["metrics"]})
            table[name] = {
                m: spread([r["strategies"][name]["metrics"][m] for r in mine]) for m in metrics
            }
        summary[str(sc)] = table
        headline = HEADLINE[sc]
        gains[str(sc)] = {}
        for base in BASELINES[sc]:
            per_seed = [
                r["strategies"][OURS]["metrics"][headline]
                / r["strategies"][base]["metrics"][headline]
                - 1
                for r in mine
                if r["strategies"][base]["metrics"][headline]
            ]
            gains[str(sc)][base] = spread(per_seed)
        if sc == Scenario.B:
            gains["B"]["preemptions_over_gepetto"] = spread(
                [
                    r["strategies"][OURS]["metrics"]["preemptions"]
                    - r["strategies"]["gepetto-default"]["metrics"]["preemptions"]
                    for r in mine
                ]
            )
        print(f"\nScenario {sc}, seeds {args.seeds}: mean (sd) [min..max]")
        print(f"  {'metric':<28}" + "".join(f"{n:>30}" for n in names(sc)))
        for metric in SHOWN[sc]:
            cells = []
            for name in names(sc):
                s = table[name].get(metric, {})
                if s.get("mean") is None:
                    cells.append(f"{'-':>30}")
                    continue
                cells.append(
                    f"{s['mean']:>10.4g} ({s['sd']:.2g}) [{s['min']:.3g}..{s['max']:.3g}]".rjust(30)
                )
            print(f"  {metric:<28}" + "".join(cells))
        for base, g in gains[str(sc)].items():
            if g["mean"] is None:
                continue
            if base == "preemptions_over_gepetto":
                print(
                    f"  {OURS} preemptions minus gepetto-default's: {g['mean']:+.1f} mean, "
                    f"{g['max']:+.0f} at most"
                )
                continue
            print(
                f"  {OURS} {headline} vs {base}: {100 * g['mean']:+.1f} % mean, "
                f"{100 * g['min']:+.1f} % at worst, {100 * g['max']:+.1f} % at best"
            )
    summary["gains"] = gains
    if args.speed:
        summary["speed"] = speed(args.speed_scale)
        s = summary["speed"]
        print(
            f"\nSpeed: one simulated day, scenario A, {s['fleet_gpus']} GPUs here "
            f"({4 * s['fleet_gpus']} in the market): "
            + ", ".join(
                f"{n} {v['wall_s']:.1f} s wall / {v['cpu_s']:.1f} s CPU"
                for n, v in s["runs"].items()
            )
            + f"; total with the market's preparation {s['total']['wall_s']:.1f} s wall / "
            f"{s['total']['cpu_s']:.1f} s CPU"
        )
    sys.stdout.flush()
    print(json.dumps(report.plain(summary)))


if __name__ == "__main__":
    main()
