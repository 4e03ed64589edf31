"""`gpuprovider rent ...`: environments tenants log in to over SSH."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from gpuprovider.cli.client import CliError
from gpuprovider.cli.common import JSON, globals_of
from gpuprovider.cli.output import Id, ago, console, print_json, table
from gpuprovider.domain.durations import parse_duration
from gpuprovider.rentals import image as rental_image

rent_app = typer.Typer(help="Rentals: environments you log in to over SSH.", no_args_is_help=True)

NAME = typer.Argument(..., help="Rental name or id.")


def _ports(values: list[str], http: bool) -> list[dict[str, Any]]:
    """`web` or `web=30010`: a named TCP port, given one or asking for that number."""
    ports = []
    for value in values:
        name, _, number = value.partition("=")
        if number and not number.isdigit():
            raise CliError(f"{value}: expected NAME or NAME=NUMBER, e.g. web=30010", 2)
        ports.append({"name": name, "http": http, **({"port": int(number)} if number else {})})
    return ports


def _keys(paths: list[Path]) -> list[str]:
    keys = []
    for path in paths:
        try:
            keys += [line for line in path.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise CliError(f"--key {path}: {exc.strerror}", 2) from None
    return keys


@rent_app.command("create")
def create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Its name, also the user you log in as."),
    image: str = typer.Option(rental_image.DEFAULT_IMAGE, help="Container image."),
    key: list[Path] = typer.Option(..., help="An SSH public key file (repeatable)."),
    gpu: str = typer.Option("0", help="GPUs: 1, 0.5, H100:80GB:2."),
    whole_node: bool = typer.Option(False, help="Every GPU, CPU and memory of one node."),
    cpu: float = typer.Option(1.0, help="Cores."),
    memory: int = typer.Option(1024, help="Memory in MiB."),
    disk: float = typer.Option(1.0, help="Persistent disk in GiB."),
    duration: str = typer.Option("", help="How long (90m, 2h); empty: until stopped."),
    port: list[str] = typer.Option([], help="A raw TCP port: NAME or NAME=NUMBER."),
    http: list[str] = typer.Option([], help="An HTTP port, also through the gateway."),
    as_json: bool = JSON,
) -> None:
    """Rent an environment: its SSH server answers on a port of its own."""
    ports = _ports(port, False) + _ports(http, True)
    body: dict[str, Any] = {"name": name, "image": image, "ssh_keys": _keys(key), "gpu": gpu,
                            "whole_node": whole_node, "cpu": cpu, "memory_mib": memory,
                            "disk_gib": disk, "ports": ports}  # fmt: skip
    if duration:
        try:
            body["duration_s"] = parse_duration(duration)
        except ValueError as exc:
            raise CliError(f"--duration: {exc}", 2) from None
    rental = globals_of(ctx).client().post("/rentals", body)
    if as_json:
        return print_json(rental)
    _show(rental)


@rent_app.command("list")
def listed(ctx: typer.Context, as_json: bool = JSON) -> None:
    """Your rentals (an admin: everyone's)."""
    rentals = globals_of(ctx).client().get("/rentals")
    if as_json:
        return print_json(rentals)
    rows = [
        [r["name"], r["state"], r["gpu"] if not r["whole_node"] else "node",
         f"{r['disk_gib']:g}G", r["ssh"]["port"] if r["ssh"] else "-", ago(r["created_at"])]
        for r in rentals
    ]  # fmt: skip
    table("Rentals", ["NAME", "STATE", "GPU", "DISK", "SSH", "MADE"], rows)


def _show(r: dict[str, Any]) -> None:
    console.print(f"[bold]{r['name']}[/] ({r['id']}, tenant {r['tenant']}): {r['state']}")
    console.print(f"  {r['reason']}")
    gpu = "whole node" if r["whole_node"] else f"gpu {r['gpu']}"
    console.print(f"  {r['image']}, {gpu}, disk {r['disk_gib']:g} GiB")
    if r["ssh"]:
        console.print(f"  ssh: {r['ssh']['command']}")
    if r["ports"]:
        console.print("  ports: " + ", ".join(f"{k} {v}" for k, v in r["ports"].items()))
    for route in r["routes"]:
        console.print(f"  http: {route}.localhost (gateway), /s/{route}/")
    if r["ready_s"] is not None:
        console.print(f"  request to running: {r['ready_s']:.2f} s (start {r['starts']})")
    for event in r.get("events") or []:
        console.print(f"  {ago(event['at'])} {event['state']}: {event['reason']}")


@rent_app.command("get")
def get(ctx: typer.Context, name: str = NAME, as_json: bool = JSON) -> None:
    """One rental: its state and why, its SSH command, its ports, its history."""
    rental = globals_of(ctx).client().get(f"/rentals/{name}")
    if as_json:
        return print_json(rental)
    _show(rental)


@rent_app.command("ssh")
def ssh(ctx: typer.Context, name: str = NAME) -> None:
    """Print the exact ssh command, its host key written to a known_hosts file."""
    g = globals_of(ctx)
    rental = g.client().get(f"/rentals/{name}")
    if not rental["ssh"]:
        raise CliError(f"rental {name} is {rental['state']}: it has no SSH port", 2)
    known = g.home.root / "known_hosts"
    lines = known.read_text().splitlines() if known.exists() else []
    line = rental["ssh"]["known_hosts"]
    if line not in lines:
        known.parent.mkdir(parents=True, exist_ok=True)
        known.write_text("".join(f"{x}\n" for x in [*lines, line]))
    s = rental["ssh"]
    print(f"ssh -p {s['port']} -o UserKnownHostsFile={known} {s['user']}@{s['host']}")


def _act(ctx: typer.Context, name: str, action: str, as_json: bool, body: Any = None) -> None:
    rental = globals_of(ctx).client().post(f"/rentals/{name}/{action}", body)
    if as_json:
        return print_json(rental)
    console.print(f"{Id(rental['name'])}: {rental['state']} ({rental['reason']})")


@rent_app.command("stop")
def stop(ctx: typer.Context, name: str = NAME, as_json: bool = JSON) -> None:
    """Stop it; its disk, ports and host key are kept."""
    _act(ctx, name, "stop", as_json)


@rent_app.command("start")
def start(ctx: typer.Context, name: str = NAME, as_json: bool = JSON) -> None:
    """Start it again on the same disk, ports and host key."""
    _act(ctx, name, "start", as_json)


@rent_app.command("evict")
def evict(
    ctx: typer.Context,
    name: str = NAME,
    reason: str = typer.Option("the owner needs the machine", help="Told to the tenant."),
    as_json: bool = JSON,
) -> None:
    """(Owner) stop a tenant's rental, saying why; its disk is kept."""
    _act(ctx, name, "evict", as_json, {"reason": reason})


@rent_app.command("delete")
def delete(ctx: typer.Context, name: str = NAME, as_json: bool = JSON) -> None:
    """Delete a stopped rental and wipe its disk."""
    rental = globals_of(ctx).client().request("DELETE", f"/rentals/{name}")
    if as_json:
        return print_json(rental)
    console.print(f"{Id(rental['name'])}: {rental['state']}")


@rent_app.command("image")
def build_image(
    engine: str = typer.Option("podman", help="The container engine to import it into."),
    tag: str = typer.Option(rental_image.DEFAULT_IMAGE, help="The image's name."),
) -> None:
    """Make the rental image from Debian's busybox-static and dropbear-bin."""
    try:
        print(rental_image.build(engine, tag))
    except rental_image.ImageError as exc:
        raise CliError(str(exc), 2) from None
