"""`gpuprovider repair ...`, `gpuprovider alert test` and `gpuprovider accounting`."""

from __future__ import annotations

import typer

from gpuprovider.cli.client import CliError
from gpuprovider.cli.common import JSON, globals_of
from gpuprovider.cli.output import Id, ShortId, ago, console, print_json, table
from gpuprovider.cli.resources import gpu_uuid

repair_app = typer.Typer(help="Repair rules and what they did.", no_args_is_help=True)
alert_app = typer.Typer(help="Alerts to webhooks and email.", no_args_is_help=True)


@repair_app.command("events")
def repair_events(
    ctx: typer.Context,
    node: str | None = typer.Option(None, help="Only this node (name or id)."),
    gpu: str | None = typer.Option(None, help="Only this GPU (UUID, its start or NODE/INDEX)."),
    limit: int = typer.Option(50, min=1, max=10000, help="How many, the latest first."),
    as_json: bool = JSON,
) -> None:
    """What repair rules did (or, in dry-run, would have done), with their evidence."""
    client = globals_of(ctx).client()
    gpu = gpu and gpu_uuid(client, gpu)
    events = client.get("/repairs", node=node, gpu=gpu, limit=limit)
    if as_json:
        return print_json(events)
    rows = [
        [
            ago(e["at"]),
            Id(e["rule"]),
            Id(e["node_id"]),
            ShortId(e["gpu_uuid"]) if e["gpu_uuid"] else "-",
            e["action"],
            e["outcome"],
            e["detail"],
        ]
        for e in events
    ]
    table("Repair actions", ["WHEN", "RULE", "NODE", "GPU", "ACTION", "OUTCOME", "DETAIL"], rows)


@repair_app.command("rules")
def repair_rules(ctx: typer.Context, as_json: bool = JSON) -> None:
    """The rules in force: the shipped ones with provider.toml's on top."""
    found = globals_of(ctx).client().get("/repairs/rules")
    if as_json:
        return print_json(found)
    rows = []
    for rule in found["rules"]:
        when = rule["signal"]
        if rule["xids"]:
            when += " " + ", ".join(str(x) for x in rule["xids"])
        when += f" >= {rule['threshold']:g}"
        if rule["window"] not in ("0", "0s"):
            when += f" within {rule['window']}"
        rows.append([Id(rule["name"]), when, ", ".join(rule["actions"])])
    mode = "dry run: nothing is changed" if found["dry_run"] else "acting"
    table(f"Repair rules ({mode})", ["NAME", "WHEN", "ACTIONS"], rows)
    console.print(
        f"circuit breaker: at most max(1, {found['breaker_max_pct']:g}% of GPUs) taken out "
        f"per {found['breaker_window_s']:g}s"
    )


@alert_app.command("test")
def alert_test(ctx: typer.Context) -> None:
    """Send a test alert to every configured target now, and say how each went."""
    found = globals_of(ctx).client().post("/alerts/test")
    failed = 0
    for delivery in found["deliveries"]:
        mark = "ok" if delivery["ok"] else "FAILED"
        failed += not delivery["ok"]
        console.print(f"{mark:6} {delivery['target']}: {delivery['detail']}")
    if failed:
        raise CliError(f"{failed} of {len(found['deliveries'])} alert targets failed", code=1)


def accounting(
    ctx: typer.Context,
    days: float | None = typer.Option(None, min=0.01, help="Only the last DAYS days."),
    as_json: bool = JSON,
) -> None:
    """Booked and idle GPU-hours per tenant and model (idle: booked, sampled at 0 %)."""
    rows = globals_of(ctx).client().get("/accounting", days=days)
    if as_json:
        return print_json(rows)
    table(
        "GPU accounting" + (f", last {days:g} days" if days else ""),
        ["TENANT", "MODEL", "BOOKED GPU-H", "IDLE GPU-H", "IDLE"],
        [
            [
                r["tenant"],
                r["model"],
                f"{r['booked_gpu_hours']:.2f}",
                f"{r['idle_gpu_hours']:.2f}",
                f"{r['idle_ratio']:.0%}",
            ]
            for r in rows
        ],
    )
