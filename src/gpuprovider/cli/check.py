"""`gpuprovider check`: run the check suite here, show it, report it, store it."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from gpuprovider.check import GROUPS, CheckContext, UnknownGroup, run_checks, select
from gpuprovider.check.report import COLOURS, as_html, report_data
from gpuprovider.check.result import Result
from gpuprovider.cli.client import CliError, Unreachable
from gpuprovider.cli.common import Globals, globals_of
from gpuprovider.cli.output import console, errors, table
from gpuprovider.config import ConfigError, ProviderConfig, load_config
from gpuprovider.home import Home
from gpuprovider.identity.keys import load_node_key, node_id_for
from gpuprovider.store import migrate
from gpuprovider.store.store import Store, StoreError

QUICK_SCALE = 0.05


def check(
    ctx: typer.Context,
    only: list[str] = typer.Option(
        [], "--only", help=f"Run only this group (repeatable): {', '.join(GROUPS)}."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    report: Path | None = typer.Option(None, "--report", help="Write an HTML report here."),
    quick: bool = typer.Option(
        False, "--quick", help="Smaller measurements: seconds, but noisier figures."
    ),
    store: bool = typer.Option(
        True, "--store/--no-store", help="Keep the results in the provider's store."
    ),
) -> None:
    """Check this machine: preflight, hardware, compute, workload. Exit 1 on any FAIL."""
    home = globals_of(ctx).home
    try:
        checks = select(only)
    except UnknownGroup as exc:
        raise CliError(str(exc), 2) from None
    report_file = _open_report(report) if report else None
    config, node_id, note = _node(home)
    context = CheckContext(
        config,
        home.root if home.config.exists() else Path.cwd(),
        node_id,
        scale=QUICK_SCALE if quick else 1.0,
    )
    shown = errors if as_json else console
    if note:
        shown.print(f"[cyan]note[/] {note}")
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=shown,
        transient=True,
    ) as progress:
        bar = progress.add_task("checks", total=len(checks))
        run = run_checks(
            context,
            checks,
            on_start=lambda c: progress.update(bar, description=f"{c.group}: {c.title}"),
            on_done=lambda _c, _r: progress.advance(bar),
        )
    data = report_data(run.results, run.started_at, run.wall_s, node_id, run.gpu_measured)
    if store and home.config.exists():
        where = _store(globals_of(ctx), config, node_id, run.results, run.started_at)
        shown.print(f"[cyan]note[/] {where}")
    if report_file:
        with report_file:
            report_file.write(as_html(data))
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        _summary(data, report)
    raise typer.Exit(data["exit_code"])


def _open_report(path: Path):
    try:
        return path.open("w", encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot write the report to {path}: {exc.strerror}", 2) from None


def _node(home: Home) -> tuple[ProviderConfig, str, str]:
    """(config, node id, note) from the home, or defaults when it is not initialised."""
    if not home.config.exists():
        return (
            ProviderConfig(),
            "local",
            (f"{home.root} is not initialised: default settings, results not stored"),
        )
    try:
        config = load_config(home.config)
    except ConfigError as exc:
        raise CliError(str(exc), 2) from None
    return config, node_id_for(load_node_key(home.node_key)), ""


def _store(
    globals_: Globals, config: ProviderConfig, node_id: str, results: list[Result], ran_at: float
) -> str:
    """Through the running daemon, so its scheduler sees a failed GPU at once; straight
    into the store when no daemon answers."""
    body = {"ran_at": ran_at, "results": [r.to_dict() for r in results]}
    try:
        globals_.client().post(f"/nodes/{node_id}/checks", body)
        return "results sent to the running provider"
    except Unreachable:
        pass
    home = globals_.home
    db = Store(home.store_url(config.store.url))
    try:
        migrate.upgrade(db)
        with db.tx() as tx:
            tx.checks.save(node_id, results, ran_at)
    except StoreError as exc:
        raise CliError(str(exc)) from None
    finally:
        db.close()
    return "results stored (no provider running)"


def _summary(data: dict, report: Path | None) -> None:
    results = [Result.from_dict(r) for r in data["results"]]
    table(
        "gpuprovider check",
        ["CHECK", "SUBJECT", "STATUS", "VALUE", "THRESHOLD", "WHAT TO DO"],
        [
            [
                f"{r.group}/{r.name}",
                r.subject,
                Text(r.status, style=f"bold {COLOURS[r.status]}"),
                r.shown_value,
                r.threshold,
                r.advice,
            ]
            for r in results
        ],
    )
    counts = data["summary"]
    console.print(
        f"{counts['PASS']} pass, {counts['WARN']} warn, {counts['FAIL']} fail, "
        f"{counts['SKIP']} skipped in {data['wall_s']:.1f} s"
        + (f"; report {report}" if report else ""),
        markup=False,
    )
    colour = "FAIL" if data["exit_code"] else "PASS" if data["verdict"] == "FIT TO SELL" else "WARN"
    console.print(Text(data["verdict"], style=f"bold {COLOURS[colour]}"))
