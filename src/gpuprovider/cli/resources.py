"""`gpuprovider node ...`, `gpuprovider gpu ...` and `gpuprovider token ...`."""

from __future__ import annotations

import typer

from gpuprovider.cli.common import globals_of
from gpuprovider.cli.output import ago, console, print_json, table

node_app = typer.Typer(help="Nodes of the pool.", no_args_is_help=True)
gpu_app = typer.Typer(help="GPUs of every node.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)

JSON = typer.Option(False, "--json", help="Print JSON.")


@node_app.command("list")
def node_list(ctx: typer.Context, as_json: bool = JSON) -> None:
    """List nodes with their capacity and status."""
    nodes = globals_of(ctx).client().get("/nodes")
    if as_json:
        return print_json(nodes)
    rows = []
    for n in nodes:
        gpus = str(n["gpu_count"])
        if n["simulated_gpus"]:
            gpus += f" ({n['simulated_gpus']} simulated)"
        status = n["status"] + (f": {n['reason']}" if n["reason"] else "")
        rows.append(
            [
                n["name"],
                n["id"],
                n["backend"],
                status,
                n["cpu_count"],
                f"{n['memory_mib'] / 1024:.1f} GiB",
                gpus,
                ago(n["last_heartbeat"]),
            ]
        )
    table("Nodes", ["NAME", "ID", "BACKEND", "STATUS", "CPUS", "MEMORY", "GPUS", "HEARTBEAT"], rows)


@gpu_app.command("list")
def gpu_list(ctx: typer.Context, as_json: bool = JSON) -> None:
    """List GPUs, marking simulated ones, with the share in use."""
    gpus = globals_of(ctx).client().get("/gpus")
    if as_json:
        return print_json(gpus)
    rows = [
        [
            g["node"],
            g["index"],
            g["model"] + (" [simulated]" if g["simulated"] else ""),
            f"{g['memory_gb']} GB",
            g["health"] if g["present"] else "absent",
            f"{g['used_share']:g}",
            ",".join(g["tasks"]),
            g["uuid"],
        ]
        for g in gpus
    ]
    table("GPUs", ["NODE", "IDX", "MODEL", "MEMORY", "HEALTH", "IN USE", "TASKS", "UUID"], rows)


@token_app.command("create")
def token_create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Token name; also the tenant unless --tenant."),
    scope: list[str] = typer.Option(["read", "submit"], "--scope", help="read, submit, admin"),
    tenant: str | None = typer.Option(None, help="Tenant whose tasks the token sees."),
    as_json: bool = JSON,
) -> None:
    """Create an API token (shown once)."""
    made = (
        globals_of(ctx).client().post("/tokens", {"name": name, "scopes": scope, "tenant": tenant})
    )
    if as_json:
        return print_json(made)
    console.print(
        f"token {made['name']} (tenant {made['tenant']}, scopes {', '.join(made['scopes'])}):"
    )
    print(made["token"])


@token_app.command("list")
def token_list(ctx: typer.Context, as_json: bool = JSON) -> None:
    """List API tokens (names and scopes, never the secrets)."""
    tokens = globals_of(ctx).client().get("/tokens")
    if as_json:
        return print_json(tokens)
    table(
        "Tokens",
        ["NAME", "TENANT", "SCOPES", "CREATED"],
        [[t["name"], t["tenant"], ",".join(t["scopes"]), ago(t["created_at"])] for t in tokens],
    )
