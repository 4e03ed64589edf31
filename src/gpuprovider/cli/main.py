"""The `gpuprovider` command. Exit codes: 0 ok, 1 failure, 2 bad usage or input."""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from typer.core import TyperGroup

from gpuprovider import __version__
from gpuprovider.cli.client import CliError
from gpuprovider.cli.common import Globals
from gpuprovider.cli.output import errors
from gpuprovider.home import Home

if TYPE_CHECKING:  # typer vendors click (0.2x): its Command and Context, not click's
    from typer import _click as click

# Each command's module, loaded only when that command runs (or `--help` lists them):
# most commands only talk to the API and need none of the daemon, the hub, the gateway
# or the checks that the others bring in (a second and more at every call otherwise).
COMMANDS = {
    "init": "provider:init",
    "up": "provider:up",
    "check": "check:check",
    "accounting": "watch:accounting",
    "events": "events:events",
    "task": "task:task_app",
    "pipeline": "pipeline:pipeline_app",
    "node": "resources:node_app",
    "gpu": "resources:gpu_app",
    "token": "resources:token_app",
    "volume": "volume:volume_app",
    "proof": "proof:proof_app",
    "key": "key:key_app",
    "repair": "watch:repair_app",
    "service": "gateway:service_app",
    "rent": "rent:rent_app",
    "gateway": "gateway:gateway_app",
    "alert": "watch:alert_app",
    "market": "market:market_app",
    "price": "market:price_app",
    "hub": "hub:hub_app",
    "fleet": "fleet:fleet_app",
    "install-service": "fleet:install_service",
}


class LazyGroup(TyperGroup):
    """The top-level command group, whose commands come from COMMANDS on demand."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, _, attribute = COMMANDS[cmd_name].partition(":")
        found = getattr(importlib.import_module(f"gpuprovider.cli.{module}"), attribute)
        if isinstance(found, typer.Typer):
            command: click.Command = typer.main.get_group(found)
        else:  # a function: a command of its own
            single = typer.Typer()
            single.command(cmd_name)(found)
            command = typer.main.get_command(single)
        command.name = cmd_name
        return command


app = typer.Typer(
    cls=LazyGroup,
    help="Turn GPU servers into a compute provider.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    home: str | None = typer.Option(
        None, help="Provider home (default $GPUPROVIDER_HOME or ~/.gpuprovider)."
    ),
    url: str | None = typer.Option(None, help="API URL (default from the home's config)."),
    token: str | None = typer.Option(None, help="API token (default the home's admin token)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True),
) -> None:
    ctx.obj = Globals(Home.resolve(home), url, token)


def run() -> None:
    try:
        app(standalone_mode=True)
    except CliError as exc:
        # never folded: a path or a value in it stays whole, to copy and to grep
        errors.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.code)
