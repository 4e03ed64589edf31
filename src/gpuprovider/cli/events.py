"""`gpuprovider events`: the journal, every transition of what this token may see
(tasks, nodes, services, leases), printed as it happened and, with --follow, as it
happens."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import typer
from rich.markup import escape

from gpuprovider.cli.common import globals_of
from gpuprovider.cli.output import console, print_json


def _line(row: dict[str, Any]) -> str:
    at = datetime.fromtimestamp(row["at"]).strftime("%H:%M:%S")
    change = row["to"] if row["from"] in (None, row["to"]) else f"{row['from']} -> {row['to']}"
    if row["from"] == row["to"]:
        change = f"({row['to']})"
    return f"{at} {row['kind']} {row['id']} {change}: {row['reason']}"


def events(
    ctx: typer.Context,
    kind: list[str] = typer.Option(
        [], "--kind", help="task, node, service, lease, pipeline or stage (repeat for several)."
    ),
    subject: str | None = typer.Option(None, "--id", help="One task, node, service or lease."),
    tenant: str | None = typer.Option(None, "--tenant", help="Admin: one tenant's events."),
    after: str = typer.Option("", "--after", help="A cursor: events after it (default: all)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new events."),
    limit: int = typer.Option(100, "--limit", min=1, max=1000, help="Events per page."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per event."),
) -> None:
    """What changed, in order, with the reason of each change."""
    client = globals_of(ctx).client()
    params = {"kind": kind or None, "id": subject, "tenant": tenant}
    cursor = after
    while True:  # what has happened, a page at a time
        page = client.get("/events", after=cursor or None, limit=limit, **params)
        for row in page["events"]:
            _show(row, as_json)
        cursor = page["next"]
        if len(page["events"]) < limit:
            break
    while follow:  # then what happens, resuming where a dropped stream stopped
        query = {k: v for k, v in {**params, "after": cursor}.items() if v}
        for event, data, ident in client.stream_with_ids("/events/stream", **query):
            if event == "dropped":
                break
            _show(data, as_json)
            cursor = ident or cursor


def _show(row: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(row)
    else:
        console.print(escape(_line(row)), highlight=False, soft_wrap=True)
