"""`gpuprovider node ...`, `gpuprovider gpu ...` and `gpuprovider token ...`."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import typer

from gpuprovider.backends.ray.common import BadRayAddress, RayBackendError, ray_node_env
from gpuprovider.backends.ray.join import check_head, join_command
from gpuprovider.cli.client import Client, CliError
from gpuprovider.cli.common import JSON, globals_of
from gpuprovider.cli.output import Id, ShortId, ago, console, print_json, table
from gpuprovider.config import SimulatedGpu
from gpuprovider.fleet.units import NodeConfig

node_app = typer.Typer(help="Nodes of the pool.", no_args_is_help=True)
gpu_app = typer.Typer(help="GPUs of every node.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)


@node_app.command("list")
def node_list(
    ctx: typer.Context,
    every: bool = typer.Option(False, "--all", help="Removed nodes too."),
    as_json: bool = JSON,
) -> None:
    """List nodes with their capacity and status."""
    nodes = globals_of(ctx).client().get("/nodes", removed="true" if every else None)
    if as_json:
        return print_json(nodes)
    rows = []
    for n in nodes:
        gpus = str(n["gpu_count"])
        if n["simulated_gpus"]:
            gpus += f" ({n['simulated_gpus']} simulated)"
        status = n["status"] + (f": {n['reason']}" if n["reason"] else "")
        for bad in n["unusable_gpus"]:
            status += f"; GPU {bad['index']} unusable: {bad['reason']}"
        lacking: dict[str, list[str]] = {}  # why -> what lacks for that reason
        for what, how in (n["facts"].get("isolation") or {}).items():
            if how.startswith("none"):
                lacking.setdefault(how, []).append(what)
        if lacking:  # tasks are not kept from each other: say so where it is seen
            status += "; isolation: " + "; ".join(f"{', '.join(w)} {h}" for h, w in lacking.items())
        rows.append(
            [
                n["name"],
                Id(n["id"]),
                n["backend"],
                status,
                n["cpu_count"],
                f"{n['memory_mib'] / 1024:.1f} GiB",
                gpus,
                ago(n["last_heartbeat"]),
            ]
        )
    columns = ["NAME", "ID", "BACKEND", "STATUS", "CPUS", "MEMORY", "GPUS", "HEARTBEAT"]
    table("Nodes", columns, rows, optional=["BACKEND", "ID"])


@node_app.command("join")
def node_join(
    head: str | None = typer.Argument(None, help="The Ray head's host:port."),
    name: str = typer.Option(socket.gethostname(), help="This node's name in the provider."),
    simulate_gpu: list[str] = typer.Option(
        [], "--simulate-gpu", help="Declare simulated GPUs, MODEL:COUNT (repeatable)."
    ),
    label: list[str] = typer.Option([], "--label", help="A node label KEY=VALUE (repeatable)."),
    num_cpus: int | None = typer.Option(None, help="CPUs Ray may use here (default: all)."),
    node_ip: str | None = typer.Option(None, help="This machine's address as the head sees it."),
    config: Path | None = typer.Option(
        None, "--config", help="Join as a node.toml says (written by `fleet add`)."
    ),
    block: bool = typer.Option(
        False, "--block", help="Stay in the foreground as Ray's own process (under systemd)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check, print `ray start`, stop."),
) -> None:
    """Make this machine a node of a provider running on Ray (wraps `ray start`)."""

    if config is not None:
        if head is not None or simulate_gpu or label or num_cpus is not None or node_ip:
            raise CliError("--config says everything: give no HEAD nor other option with it", 2)
        try:
            joined = NodeConfig.read(config)
        except ValueError as exc:
            raise CliError(f"--config {exc}", 2) from None
        head, name, simulate_gpu, num_cpus, node_ip = (
            joined.head,
            joined.name,
            joined.simulate_gpus,
            joined.num_cpus,
            joined.node_ip,
        )
        label = [f"{k}={v}" for k, v in joined.labels.items()]
    if head is None:
        raise CliError("name the Ray head's host:port (or --config FILE)", 2)
    sims = [_simulated(text) for text in simulate_gpu]
    labels = dict(_label(text) for text in label)
    if not re.fullmatch(LABEL_VALUE, name):
        raise CliError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (<= 63)", 2)
    try:
        version = check_head(head)
    except RayBackendError as exc:
        raise CliError(str(exc), 2 if isinstance(exc, BadRayAddress) else 1) from None
    argv = join_command(head, name, sims, labels, num_cpus, node_ip)
    argv[0] = str(Path(sys.executable).parent / "ray")
    if block:
        argv.append("--block")
    console.print(f"head {head} runs gpuprovider {version}; joining as {name}")
    if dry_run:
        print(shlex.join(argv))
        return
    env = ray_node_env()
    if block:  # Ray itself becomes this process: systemd watches and restarts it
        sys.stdout.flush()
        os.execve(argv[0], argv, env)
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise CliError(f"`ray start` failed:\n{done.stderr.strip() or done.stdout.strip()}")
    console.print(f"joined: node {name} appears in `gpuprovider node list` within seconds")


LABEL_VALUE = r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?"


def _simulated(text: str) -> tuple[str, int]:
    try:
        gpu = SimulatedGpu.parse(text)
    except ValueError as exc:
        raise CliError(f"--simulate-gpu {exc}", 2) from None
    return gpu.model, gpu.count


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not re.fullmatch(LABEL_VALUE, key) or not re.fullmatch(LABEL_VALUE, value):
        raise CliError(f"--label {text!r}: write KEY=VALUE with letters, digits, '.', '_', '-'", 2)
    return key, value


@node_app.command("drain")
def node_drain(
    ctx: typer.Context, node: str = typer.Argument(..., help="Node name or id.")
) -> None:
    """No new work on a node: its jobs finish there, its services move elsewhere."""
    done = globals_of(ctx).client().post(f"/nodes/{node}/drain")
    console.print(f"node {done['node']} draining")
    if done["moved"]:
        console.print(f"  services moving elsewhere: {', '.join(done['moved'])}")
    if done["finishing"]:
        console.print(f"  finishing there: {', '.join(done['finishing'])}")
    console.print(f"then `gpuprovider node remove {done['node']}` once nothing runs there")


@node_app.command("cordon")
def node_cordon(
    ctx: typer.Context,
    node: str = typer.Argument(..., help="Node name or id."),
    reason: str = typer.Option("", help="Why, shown wherever the node is."),
) -> None:
    """No new work on a node; what runs there stays (drain moves services too)."""
    done = globals_of(ctx).client().post(f"/nodes/{node}/cordon", {"reason": reason})
    console.print(f"node {done['node']} cordoned")


@node_app.command("resume")
def node_resume(
    ctx: typer.Context, node: str = typer.Argument(..., help="Node name or id.")
) -> None:
    """Give a cordoned or drained node work again."""
    done = globals_of(ctx).client().post(f"/nodes/{node}/resume")
    console.print(f"node {done['node']} ready")


node_app.command("uncordon", help="Give a cordoned or drained node work again.")(node_resume)


@node_app.command("remove")
def node_remove(
    ctx: typer.Context, node: str = typer.Argument(..., help="Node name or id.")
) -> None:
    """Forget a drained node that runs nothing (stop its Ray node first, or it rejoins)."""
    done = globals_of(ctx).client().request("DELETE", f"/nodes/{node}")
    console.print(f"node {done['node']} removed")


@node_app.command("checks")
def node_checks(
    ctx: typer.Context,
    node: str | None = typer.Argument(None, help="Node name or id (default: the only node)."),
    as_json: bool = JSON,
) -> None:
    """The latest result of every check on a node (`gpuprovider check`, preflight at `up`)."""
    client = globals_of(ctx).client()
    if node is None:
        nodes = client.get("/nodes")
        if len(nodes) != 1:
            names = ", ".join(n["name"] for n in nodes) or "none yet"
            raise CliError(f"name the node: {names}", 2)
        node = nodes[0]["id"]
    found = client.get(f"/nodes/{node}/checks")
    if as_json:
        return print_json(found)
    table(
        f"Checks on {found['node']}",
        ["CHECK", "STATUS", "VALUE", "THRESHOLD", "WHAT TO DO", "RAN"],
        [
            [
                r["key"],
                r["status"],
                f"{r['value']} {r['unit']}".strip() if r["value"] is not None else "",
                r["threshold"],
                r["advice"],
                ago(r["ran_at"]),
            ]
            for r in found["results"]
        ],
    )


@gpu_app.command("list")
def gpu_list(ctx: typer.Context, as_json: bool = JSON) -> None:
    """List GPUs, marking simulated ones, with the share in use."""
    gpus = globals_of(ctx).client().get("/gpus")
    if as_json:
        return print_json(gpus)
    rows = [
        [
            Id(f"{g['node']}/{g['index']}"),
            g["model"] + (" [simulated]" if g["simulated"] else ""),
            f"{g['memory_gb']} GB",
            (g["health"] + (f": {g['health_reason']}" if g["health_reason"] else ""))
            if g["present"]
            else "absent",
            g["unusable_reason"] or "yes",
            f"{g['used_share']:g}",
            [Id(task) for task in g["tasks"]],
            _proof(g["proof"]),
            ShortId(g["uuid"]),
        ]
        for g in gpus
    ]
    columns = ["GPU", "MODEL", "MEMORY", "HEALTH", "NEW WORK", "USE", "TASKS", "PROOF", "UUID"]
    table("GPUs", columns, rows, optional=["UUID"])


@gpu_app.command("history")
def gpu_history(
    ctx: typer.Context,
    uuid: str = typer.Argument(..., help="GPU UUID, its start, or NODE/INDEX."),
) -> None:
    """A GPU's utilisation and memory, one point per minute over the last 24 hours (JSON)."""
    client = globals_of(ctx).client()
    print_json(client.get(f"/gpus/{gpu_uuid(client, uuid)}/history"))


@gpu_app.command("cordon")
def gpu_cordon(
    ctx: typer.Context,
    uuid: str = typer.Argument(
        ..., help="GPU UUID, its start, or NODE/INDEX (`gpu list` shows them)."
    ),
    reason: str = typer.Option("", help="Why, shown wherever the GPU is."),
) -> None:
    """No new work on one GPU; what runs there stays."""
    client = globals_of(ctx).client()
    done = client.post(f"/gpus/{gpu_uuid(client, uuid)}/cordon", {"reason": reason})
    console.print(f"GPU {done['gpu_uuid']} cordoned ({done['reason']})")


@gpu_app.command("uncordon")
def gpu_uncordon(
    ctx: typer.Context,
    uuid: str = typer.Argument(..., help="GPU UUID, its start, or NODE/INDEX."),
    force: bool = typer.Option(
        False, "--force", help="Also lift a repair rule's cordon without a passing check."
    ),
) -> None:
    """Give a cordoned GPU work again (a repair rule's cordon: after a passing check)."""
    params = {"force": "true"} if force else {}
    client = globals_of(ctx).client()
    done = client.post(f"/gpus/{gpu_uuid(client, uuid)}/uncordon", **params)
    console.print(f"GPU {done['gpu_uuid']} takes work again")


def gpu_uuid(client: Client, ref: str) -> str:
    """The GPU `ref` names: its UUID, the start of it (`gpu list` shows a prefix when
    the terminal is narrow), or NODE/INDEX as `gpu list` shows it; `ref` as given when
    none matches (the API says so)."""
    gpus = client.get("/gpus")
    uuids = [g["uuid"] for g in gpus]
    if ref in uuids:
        return ref
    for g in gpus:
        if ref == f"{g['node']}/{g['index']}":
            return str(g["uuid"])
    matches = [u for u in uuids if u.startswith(ref)] if len(ref) >= 4 else []
    if len(matches) > 1:
        raise CliError(f"GPU {ref!r} could be any of {', '.join(matches)}: give more of it", 2)
    return matches[0] if matches else ref


def _proof(proof: dict | None) -> str:
    if proof is None:
        return "none"
    verdict = "passed" if proof["passed"] else f"failed: {proof['reason']}"
    return f"{verdict} ({ago(proof['at'])})"


@token_app.command("create")
def token_create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Token name; also the tenant unless --tenant."),
    scope: list[str] = typer.Option(
        ["read", "submit"],
        "--scope",
        help="read, submit, admin, verify, metrics; service:NAME calls that service only.",
    ),
    tenant: str | None = typer.Option(None, help="Tenant whose tasks the token sees."),
    expires_in: str | None = typer.Option(
        None, "--expires-in", help="Refused after this long: 3600s, 90m, 12h, 30d."
    ),
    as_json: bool = JSON,
) -> None:
    """Create an API token (shown once)."""
    body: dict[str, Any] = {"name": name, "scopes": scope, "tenant": tenant}
    if expires_in is not None:
        body["expires_in_s"] = _duration(expires_in)
    made = globals_of(ctx).client().post("/tokens", body)
    if as_json:
        return print_json(made)
    console.print(
        f"token {made['name']} (tenant {made['tenant']}, scopes {', '.join(made['scopes'])}):"
    )
    print(made["token"])


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> float:
    """Seconds in `30d`, `12h`, `90m`, `3600s` (or plain seconds)."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in DURATION_UNITS else (text, "s")
    try:
        seconds = float(number) * DURATION_UNITS[unit]
    except ValueError:
        raise CliError(
            f"--expires-in {text!r}: write a duration such as 30d, 12h or 90m", 2
        ) from None
    if not 0 < seconds < float("inf"):
        raise CliError(f"--expires-in {text!r}: must be a positive duration", 2)
    return seconds


@token_app.command("list")
def token_list(ctx: typer.Context, as_json: bool = JSON) -> None:
    """List API tokens (names and scopes, never the secrets), revoked and expired too."""
    tokens = globals_of(ctx).client().get("/tokens")
    if as_json:
        return print_json(tokens)
    table(
        "Tokens",
        ["NAME", "TENANT", "SCOPES", "CREATED", "STATUS"],
        [
            [t["name"], t["tenant"], ",".join(t["scopes"]), ago(t["created_at"]), _status(t)]
            for t in tokens
        ],
    )


def _status(token: dict) -> str:
    if token["revoked_at"] is not None:
        return f"revoked {ago(token['revoked_at'])}"
    if token["expires_at"] is None:
        return "valid"
    if token["expires_at"] <= time.time():
        return f"expired {ago(token['expires_at'])}"
    return f"valid until {datetime.fromtimestamp(token['expires_at']):%Y-%m-%d %H:%M}"


@token_app.command("revoke")
def token_revoke(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Token name."),
    as_json: bool = JSON,
) -> None:
    """Revoke a token: the provider refuses it from now on."""
    token = globals_of(ctx).client().request("DELETE", f"/tokens/{name}")
    if as_json:
        return print_json(token)
    console.print(f"token {token['name']} revoked")
