"""The `gpuprovider` command. Exit codes: 0 ok, 1 failure, 2 bad usage or input."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from gpuprovider import __version__
from gpuprovider.cli import provider
from gpuprovider.cli.check import check
from gpuprovider.cli.client import CliError
from gpuprovider.cli.common import Globals
from gpuprovider.cli.gateway import gateway_app, service_app
from gpuprovider.cli.hub import hub_app
from gpuprovider.cli.key import key_app
from gpuprovider.cli.market import market_app, price_app
from gpuprovider.cli.output import errors
from gpuprovider.cli.proof import proof_app
from gpuprovider.cli.resources import gpu_app, node_app, token_app
from gpuprovider.cli.task import task_app
from gpuprovider.cli.watch import accounting, alert_app, gpu_history, repair_app
from gpuprovider.home import Home

app = typer.Typer(
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


app.command()(provider.init)
app.command()(provider.up)
app.command()(check)
app.add_typer(task_app, name="task")
app.add_typer(node_app, name="node")
app.add_typer(gpu_app, name="gpu")
app.add_typer(token_app, name="token")
app.add_typer(proof_app, name="proof")
app.add_typer(key_app, name="key")
app.add_typer(repair_app, name="repair")
app.add_typer(service_app, name="service")
app.add_typer(gateway_app, name="gateway")
app.add_typer(alert_app, name="alert")
app.add_typer(market_app, name="market")
app.add_typer(price_app, name="price")
app.add_typer(hub_app, name="hub")
app.command("accounting")(accounting)
gpu_app.command("history")(gpu_history)


def run() -> None:
    try:
        app(standalone_mode=True)
    except CliError as exc:
        errors.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(exc.code)
