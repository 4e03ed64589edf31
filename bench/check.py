"""`gpuprovider check` figures: whole-suite wall time and repeatability.

Runs the full suite (default sizes, not --quick) three times in a row, as an operator
would, and reports for every measured figure (GEMM, bandwidths, disk) its spread across
the runs: (max - min) / median. The baseline is the DeepBrainChain acceptance suite this
replaces: about 10 minutes on four RTX 2080 Ti (its published figure; it needs a VM and a
GPU, so it cannot run here).

Usage: python bench/check.py [--runs 3]
Prints a human summary, then JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from gpuprovider.testing import GPUPROVIDER

RATE_UNITS = {"GB/s", "MB/s", "GFLOPS", "TFLOPS", "TOPS"}
DBC_SUITE_S = 600.0  # DeepBrainChain's suite on 4 x RTX 2080 Ti, from its guide


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    walls, figures = [], {}
    gpus = 0
    with tempfile.TemporaryDirectory() as home:
        for _ in range(args.runs):
            done = subprocess.run(
                [GPUPROVIDER, "--home", str(Path(home) / "none"), "check", "--json"],
                capture_output=True,
                text=True,
                cwd=home,
            )
            report = json.loads(done.stdout)
            walls.append(report["wall_s"])
            for r in report["results"]:
                if r["unit"] in RATE_UNITS and isinstance(r["value"], float):
                    key = f"{r['group']}/{r['name']}" + (f" {r['subject']}" if r["subject"] else "")
                    figures.setdefault(key, (r["unit"], []))[1].append(r["value"])
                gpus = max(gpus, sum(1 for x in report["results"] if x["name"] == "vram"
                                     and x["status"] != "SKIP"))  # fmt: skip
    spreads = {
        key: {
            "unit": unit,
            "median": statistics.median(values),
            "spread_pct": 100 * (max(values) - min(values)) / statistics.median(values),
        }
        for key, (unit, values) in figures.items()
    }
    print(f"{args.runs} runs of the full suite, {gpus} GPU(s) measured")
    print(f"wall time per run: {', '.join(f'{w:.1f} s' for w in walls)} "
          f"(baseline: DBC suite ~{DBC_SUITE_S:.0f} s on 4 GPUs)")  # fmt: skip
    for key, s in spreads.items():
        print(f"  {key:40s} {s['median']:12,.1f} {s['unit']:7s} spread {s['spread_pct']:5.2f} %")
    print(
        json.dumps(
            {
                "runs": args.runs,
                "gpus_measured": gpus,
                "wall_s": walls,
                "baseline_dbc_suite_s": DBC_SUITE_S,
                "figures": spreads,
                "max_spread_pct": max((s["spread_pct"] for s in spreads.values()), default=None),
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
