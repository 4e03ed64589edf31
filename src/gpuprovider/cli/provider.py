"""`gpuprovider init` and `gpuprovider up`."""

from __future__ import annotations

import logging

import typer

from gpuprovider.bootstrap import init_home
from gpuprovider.cli.client import CliError
from gpuprovider.cli.common import globals_of
from gpuprovider.cli.output import console
from gpuprovider.config import ConfigError, load_config
from gpuprovider.daemon.daemon import DaemonError, run_daemon


def init(
    ctx: typer.Context,
    simulate_gpus: bool | None = typer.Option(
        None,
        "--simulate-gpus/--no-simulate-gpus",
        help="Declare 2 simulated GPUs (default: only when no NVIDIA GPU is found).",
    ),
) -> None:
    """Create the provider's home: config, store, admin token, node key."""
    home = globals_of(ctx).home
    try:
        report = init_home(home, simulate_gpus)
    except ConfigError as exc:
        raise CliError(str(exc), 2) from None
    for item in report.created:
        console.print(f"[green]created[/] {item}")
    for item in report.kept:
        console.print(f"[yellow]exists, kept[/] {item}")
    if report.simulated_note:
        console.print(f"[cyan]note[/] {report.simulated_note}")
    console.print(f"node id {report.node_id}")
    if report.admin_token:
        console.print(
            "\nAdmin API token (shown once; the CLI on this machine reads it from the home):\n"
            f"  {report.admin_token}"
        )


def up(ctx: typer.Context) -> None:
    """Run the provider: HTTP API and loops, until Ctrl-C or SIGTERM."""
    home = globals_of(ctx).home
    try:
        config = load_config(home.config)
    except ConfigError as exc:
        raise CliError(str(exc), 2) from None
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        run_daemon(home, config)
    except DaemonError as exc:
        raise CliError(str(exc)) from None
