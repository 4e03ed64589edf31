"""`gpuprovider volume ...`: a tenant's named, size-limited folders that outlive tasks."""

from __future__ import annotations

import typer

from gpuprovider.cli.client import CliError
from gpuprovider.cli.common import JSON, globals_of
from gpuprovider.cli.output import ago, console, print_json, table
from gpuprovider.domain.resources import parse_memory_mib

volume_app = typer.Typer(
    help="Volumes: folders kept across attempts and tasks (a spec mounts them).",
    no_args_is_help=True,
)


@volume_app.command("create")
def create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Letters, digits, '.', '_', '-'; up to 63."),
    size: str = typer.Option(..., help="Size limit, e.g. 10GB."),
    as_json: bool = JSON,
) -> None:
    """Make a volume; mount it with `task run --volume NAME:PATH`."""
    try:
        size_mib = parse_memory_mib(size)
    except ValueError as exc:
        raise CliError(f"--size {size!r}: {exc}", 2) from None
    made = globals_of(ctx).client().post("/volumes", {"name": name, "size_mib": size_mib})
    if as_json:
        return print_json(made)
    console.print(f"volume {made['name']} {made['size_bytes'] >> 20} MiB", markup=False)


@volume_app.command("list")
def list_volumes(ctx: typer.Context, as_json: bool = JSON) -> None:
    """Your volumes, with what they hold."""
    found = globals_of(ctx).client().get("/volumes")
    if as_json:
        return print_json(found)
    rows = [
        [
            v["name"],
            f"{v['used_bytes'] >> 20} MiB",
            f"{v['size_bytes'] >> 20} MiB",
            ago(v["created_at"]),
        ]
        for v in found
    ]
    table("Volumes", ["NAME", "USED", "SIZE", "AGE"], rows)


@volume_app.command("delete")
def delete(ctx: typer.Context, name: str = typer.Argument(...)) -> None:
    """Delete a volume and its files (refused while a live task mounts it)."""
    globals_of(ctx).client().request("DELETE", f"/volumes/{name}")
    console.print(f"volume {name} deleted", markup=False)
