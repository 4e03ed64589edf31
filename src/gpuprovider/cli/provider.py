"""`gpuprovider init` and `gpuprovider up`."""

from __future__ import annotations

import logging

import typer
from pydantic import TypeAdapter

from gpuprovider.backends.ray.trial import LocalRayCluster
from gpuprovider.backends.registry import BACKENDS
from gpuprovider.bootstrap import init_home
from gpuprovider.cli.client import CliError
from gpuprovider.cli.common import globals_of
from gpuprovider.cli.output import console
from gpuprovider.cli.runnable import runnable_config
from gpuprovider.config import BackendConfig, ConfigError, RayBackendConfig, SimulatedGpu
from gpuprovider.daemon.daemon import DaemonError, run_daemon
from gpuprovider.store.store import StoreError


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
    except StoreError as exc:
        raise CliError(str(exc)) from None
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


def up(
    ctx: typer.Context,
    backend: str | None = typer.Option(
        None, help="local or ray (default: \\[backend] kind in provider.toml)."
    ),
    ray_node: list[str] = typer.Option(
        [],
        "--ray-node",
        help="With --backend ray and no \\[backend] address: start a local trial Ray node "
        "with these simulated GPUs, NAME=MODEL:COUNT[,MODEL:COUNT] (repeatable).",
    ),
) -> None:
    """Run the provider: HTTP API and loops, until Ctrl-C or SIGTERM."""
    home = globals_of(ctx).home
    config = runnable_config(home)
    if backend not in (None, *BACKENDS):
        raise CliError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}", 2)
    if backend and backend != config.backend.kind:
        config.backend = TypeAdapter(BackendConfig).validate_python({"kind": backend})
    trial_nodes = [_trial_node(text) for text in ray_node]
    ray = config.backend if isinstance(config.backend, RayBackendConfig) else None
    if trial_nodes and (ray is None or ray.address):
        raise CliError(
            "--ray-node starts a local trial cluster: use it with --backend ray "
            "and no [backend] address",
            2,
        )
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request is noise
    trial = None
    if ray is not None and not ray.address:
        console.print(f"starting a local Ray cluster: head + {len(trial_nodes)} node(s)")
        trial = LocalRayCluster(trial_nodes)
        ray.address = trial.address
    try:
        run_daemon(home, config)
    except DaemonError as exc:
        raise CliError(str(exc)) from None
    finally:
        if trial is not None:
            trial.shutdown()


def _trial_node(text: str) -> tuple[str, list[tuple[str, int]]]:
    name, sep, gpus = text.partition("=")
    if not sep or not name:
        raise CliError(f"--ray-node {text!r}: write NAME=MODEL:COUNT[,MODEL:COUNT]", 2)
    try:
        sims = [SimulatedGpu.parse(part) for part in filter(None, gpus.split(","))]
    except ValueError as exc:
        raise CliError(f"--ray-node {name}: {exc}", 2) from None
    return name, [(g.model, g.count) for g in sims]
