"""What every CLI command shares: the home, the client, exits on errors."""

from __future__ import annotations

from dataclasses import dataclass

import typer

from gpuprovider.cli.client import Client, resolve_endpoint
from gpuprovider.home import Home

# The --json switch every listing takes.
JSON = typer.Option(False, "--json", help="Print JSON.")


@dataclass
class Globals:
    home: Home
    url: str | None
    token: str | None

    def client(self) -> Client:
        return Client(*resolve_endpoint(self.home, self.url, self.token))


def globals_of(ctx: typer.Context) -> Globals:
    return ctx.find_root().obj
