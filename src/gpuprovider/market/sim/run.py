"""Run a scenario for named strategies on one seed: the report the CLI writes and the
figures the benchmark aggregates."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from gpuprovider.market import strategies
from gpuprovider.market.sim import apps, lease
from gpuprovider.market.sim import fleet as fleets
from gpuprovider.market.sim.report import plain


class Scenario(StrEnum):
    A = "A"  # lease market from the openb pods
    B = "B"  # inference-app market from the Azure LLM traces


BASELINES = {Scenario.A: ("akash-default", "swan-default"), Scenario.B: ("gepetto-default",)}
DESCRIPTION = {
    Scenario.A: "Lease market: openb pods as orders to this provider and {k} rivals bidding "
    "around the reference price; the lowest bid under the cap wins.",
    Scenario.B: "Inference-app market: {n} apps from the Azure LLM traces under Zipf "
    "popularity; this miner among {k} gepetto-default miners.",
}


def names(scenario: Scenario) -> tuple[str, ...]:
    return strategies.LEASE if scenario == Scenario.A else strategies.APPS


def check_names(scenario: Scenario, wanted: Sequence[str]) -> list[str]:
    known = names(scenario)
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise strategies.UnknownStrategy(
            f"scenario {scenario} has no strategy {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(known)}"
        )
    return list(dict.fromkeys(wanted))


def simulate(
    scenario: Scenario,
    seed: int,
    wanted: Sequence[str],
    hours: float | None = None,
    fleet_scale: int = 1,
    traces: Path | None = None,
) -> dict[str, Any]:
    """Every strategy in `wanted` on the same market (orders, caps, rivals' prices,
    apps and requests all drawn from `seed`): metrics, time series, settings."""
    chosen = check_names(scenario, wanted)
    fleet = fleets.scaled(fleets.DEFAULT_FLEET, fleet_scale)
    runs: dict[str, dict[str, Any]] = {}
    if scenario == Scenario.A:
        sc = lease.LeaseScenario(fleet=fleet, traces=traces)
        if hours is not None:
            sc = replace(sc, hours=hours)
        market = lease.prepare(sc, seed)
        busy = {m: sc.busy_cost_share * p for m, p in market.reference.items()}
        for name in chosen:
            started, cpu = time.perf_counter(), time.process_time()
            result = lease.run(market, strategies.lease_strategy(name, market.table, busy))
            runs[name] = _entry(result.metrics, result.series, started, cpu, result.decisions)
        settings = asdict(sc) | {"reference_usd_per_gpu_hour": market.reference}
        description = DESCRIPTION[scenario].format(k=sc.competitors)
    else:
        sb = apps.AppScenario(fleet=fleet, traces=traces)
        if hours is not None:
            sb = replace(sb, hours=hours, warmup_hours=min(sb.warmup_hours, hours / 4))
        app_market = apps.prepare_apps(sb, seed)
        for name in chosen:
            started, cpu = time.perf_counter(), time.process_time()
            outcome = apps.run_apps(
                app_market, strategies.app_strategy(name, app_market.hourly_cost)
            )
            runs[name] = _entry(outcome.metrics, outcome.series, started, cpu, outcome.decisions)
        settings = asdict(sb) | {"hourly_cost_usd": app_market.hourly_cost}
        description = DESCRIPTION[scenario].format(n=sb.apps, k=sb.miners)
    return {
        "scenario": str(scenario),
        "seed": seed,
        "description": description,
        "settings": plain(settings),
        "strategies": runs,
    }


def _entry(
    metrics: dict[str, Any],
    series: dict[str, Any],
    started: float,
    cpu: float,
    decisions: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "metrics": dict(metrics)
        | {"wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu},
        "series": series,
        "decisions": decisions,
    }
