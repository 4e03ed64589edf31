"""`gpuprovider market status/leases/earnings` (the provider's markets, from its API),
`gpuprovider market simulate` (strategies head to head on a simulated market) and
`gpuprovider price quote SPEC` (what an order would be charged here, and why)."""

from __future__ import annotations

import importlib
import json
import tomllib
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError

from gpuprovider.cli.client import CliError
from gpuprovider.cli.common import JSON, globals_of
from gpuprovider.cli.output import Id, console, print_json, table
from gpuprovider.config import ConfigError, load_config
from gpuprovider.domain import catalogue
from gpuprovider.market.model import Order, fmt_money
from gpuprovider.market.pricing import Pricing, Unpriceable

market_app = typer.Typer(
    help="Work from markets: connectors, leases, earnings.", no_args_is_help=True
)
price_app = typer.Typer(help="Pricing: what an order is charged here.", no_args_is_help=True)


@market_app.command("status")
def status(ctx: typer.Context, as_json: bool = JSON) -> None:
    """Each configured market: registration, admission, leases by state."""
    rows = globals_of(ctx).client().request("GET", "/market")
    if as_json:
        print_json(rows)
        return
    table(
        "Markets",
        ["MARKET", "HUB", "STATUS", "RELIABILITY", "LEASES", "ORDERS SEEN", "REASON"],
        [
            [
                m["market"],
                m["url"],
                m["status"],
                _reliability(m),
                ", ".join(f"{k} {v}" for k, v in m["leases"].items()) or "-",
                m["figures"]["orders"],
                m["status_reason"],
            ]
            for m in rows
        ],
    )


def _reliability(market: dict) -> str:
    """As the market computes it, beside its floor (below it, no order comes)."""
    if market["reliability"] is None:
        return "-"
    floor = market["reliability_floor"]
    return f"{market['reliability']:.2f}" + (f" (floor {floor:g})" if floor is not None else "")


@market_app.command("leases")
def leases(ctx: typer.Context, as_json: bool = JSON) -> None:
    """Every lease: state, price, what it earned, its task and why it ended."""
    rows = globals_of(ctx).client().request("GET", "/market/leases")
    if as_json:
        print_json(rows)
        return
    table(
        "Leases",
        ["LEASE", "MARKET", "STATE", "MODEL", "GPUS", "PRICE/H", "EARNED", "TASK", "WHY"],
        [
            [
                Id(lease["id"]),
                lease["market"],
                lease["state"],
                lease["model"],
                f"{lease['gpus']:g}",
                fmt_money(lease["price_per_hour"]),
                fmt_money(lease["earned"]),
                Id(lease["task_id"]) if lease["task_id"] else "-",
                lease["close_reason"] or lease["reason"][:60],
            ]
            for lease in rows
        ],
        optional=["MARKET"],
    )


@market_app.command("earnings")
def earnings(ctx: typer.Context, as_json: bool = JSON) -> None:
    """What the leases earned by this provider's count, and what the hub paid."""
    rows = globals_of(ctx).client().request("GET", "/market/earnings")
    if as_json:
        print_json(rows)
        return
    for m in rows:
        paid = m["paid_by_the_hub"]
        console.print(
            f"{m['market']}: earned {fmt_money(m['earned_by_our_count'])} by our count, "
            f"{'unknown (hub unreachable)' if paid is None else fmt_money(paid)} paid by the "
            f"hub, {m['gpu_seconds_reported']} GPU-seconds reported over {m['leases']} leases"
        )


@market_app.command("simulate")
def simulate(
    scenario: str = typer.Option("A", "--scenario", help="A: lease market; B: app market."),
    seed: int = typer.Option(1, "--seed", help="Everything random is drawn from it."),
    strategy: list[str] = typer.Option(
        ["earnings"], "--strategy", help="A strategy to run (repeat for several)."
    ),
    baselines: bool = typer.Option(True, help="Run the scenario's default strategies too."),
    hours: float | None = typer.Option(None, min=0.25, max=24 * 14, help="Simulated hours."),
    fleet_scale: int = typer.Option(1, min=1, max=64, help="Times the default fleet."),
    traces: Path | None = typer.Option(None, help="The traces folder (default: found)."),
    out: Path = typer.Option(Path("."), help="Folder for the HTML and JSON report."),
    as_json: bool = JSON,
) -> None:
    """Strategies head to head on a simulated market: an HTML and a JSON report.

    Deterministic per seed; plots revenue, utilisation and price over time."""
    # loaded only here: the other commands need neither the traces nor the simulator
    run = importlib.import_module("gpuprovider.market.sim.run")
    report = importlib.import_module("gpuprovider.market.sim.report")
    try:
        chosen = run.Scenario(scenario.upper())
    except ValueError:
        raise CliError(f"unknown scenario {scenario!r}; choose A or B", 2) from None
    wanted = [*(run.BASELINES[chosen] if baselines else ()), *strategy]
    try:
        result = run.simulate(chosen, seed, wanted, hours, fleet_scale, traces)
    except ValueError as exc:  # bad traces, fleet, strategy name: the message says which
        raise CliError(str(exc), 2) from None
    page, data = report.write(result, out, f"market-{chosen}-seed{seed}")
    if as_json:
        print_json({"html": str(page), "json": str(data), **report.plain(result)})
        return
    metrics = sorted({m for r in result["strategies"].values() for m in r["metrics"]})
    table(
        f"Scenario {chosen}, seed {seed}",
        ["METRIC", *result["strategies"]],
        [
            [m, *(_figure(r["metrics"].get(m)) for r in result["strategies"].values())]
            for m in metrics
        ],
    )
    console.print(f"report: {page}\nfigures: {data}")


def _figure(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.4g}"


@price_app.command("quote")
def quote(
    ctx: typer.Context,
    spec: Path = typer.Argument(..., help="An order (JSON or TOML): resources, duration_s, ..."),
    model: list[str] = typer.Option([], "--model", help="Price on this GPU model only."),
    as_json: bool = JSON,
) -> None:
    """What an order would be charged here under [pricing], per GPU model, and why."""
    try:
        config = load_config(globals_of(ctx).home.config)
    except ConfigError as exc:
        raise CliError(str(exc), 2) from None
    try:
        text = spec.read_text()
        raw = tomllib.loads(text) if spec.suffix == ".toml" else json.loads(text)
        order = Order.model_validate({"id": "quote", "max_price_per_hour": 10**15, **raw})
    except (OSError, ValueError) as exc:
        raise CliError(f"{spec}: {exc}", 2) from None
    except ValidationError as exc:
        error = exc.errors()[0]
        raise CliError(f"{spec}: {'.'.join(map(str, error['loc']))}: {error['msg']}", 2) from None
    pricing = Pricing(config.pricing)
    offered = [m for m in config.pricing.gpu_hour if not catalogue.names_a_model(m)]
    models = model or (
        sorted(m for m in [*catalogue.models(), *offered] if order.resources.accepts(m))
        if order.resources.gpus
        else ["cpu"]
    )
    rows: list[dict[str, Any]] = []
    for name in models:
        try:
            q = pricing.quote(order, name)
            rows.append(
                {
                    "model": name,
                    "price_per_hour": q.price_per_hour,
                    "total": q.total,
                    "billed_s": q.billed_s,
                    "why": q.explain(),
                }
            )
        except Unpriceable as exc:
            rows.append({"model": name, "price_per_hour": None, "total": None, "why": str(exc)})
    if as_json:
        print_json(rows)
        return
    table(
        f"Quote for {spec.name} ({order.duration_s} s)",
        ["MODEL", "PER HOUR", "TOTAL", "WHY"],
        [
            [
                r["model"],
                "-" if r["total"] is None else fmt_money(r["price_per_hour"]),
                "-" if r["total"] is None else fmt_money(r["total"]),
                r["why"],
            ]
            for r in rows
        ],
    )
    if all(r["total"] is None for r in rows):
        raise typer.Exit(1)
