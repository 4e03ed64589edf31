"""`gpuprovider pipeline ...`: submit, list, inspect, pause, resume, cancel, signal and
flush multi-stage pipelines; a stage's logs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
import yaml

from gpuprovider.cli.client import CliError
from gpuprovider.cli.common import JSON, globals_of
from gpuprovider.cli.output import Id, ago, console, print_json, table

MAX_SPEC_BYTES = 1 << 20
pipeline_app = typer.Typer(help="Multi-stage pipelines.", no_args_is_help=True)


def _read_spec(file: Path) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if str(file) == "-" else file.read_text()
    except OSError as exc:
        raise CliError(f"cannot read {file}: {exc.strerror}", 2) from None
    if len(text) > MAX_SPEC_BYTES:
        raise CliError(f"{file} is larger than {MAX_SPEC_BYTES} bytes; a spec is smaller", 2)
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CliError(f"{file} is not valid YAML or JSON: {exc}", 2) from None
    except RecursionError:
        raise CliError(f"{file} nests too deep to be a pipeline spec", 2) from None
    if not isinstance(spec, dict):
        raise CliError(f"{file} must hold a mapping of spec fields, not {type(spec).__name__}", 2)
    if spec.get("kind", "pipeline") != "pipeline":
        raise CliError(f"kind: {spec['kind']!r}; a pipeline spec says kind: pipeline", 2)
    return spec


def _seconds(start: float | None, end: float | None) -> str:
    if start is None:
        return "-"
    if end is None:
        return "running"
    return f"{end - start:.1f}s"


def _show(view: dict[str, Any]) -> None:
    console.print(
        f"{view['id']} {view['name'] or ''} {view['state']}: {view['reason']}",
        markup=False,
        highlight=False,
    )
    table(
        "",
        ["STAGE", "STATE", "ATTEMPTS", "LEVEL", "TOOK", "TASK", "REASON"],
        [
            [
                s["name"],
                s["state"],
                s["attempts"],
                s["level"] or "-",
                _seconds(s["started_at"], s["finished_at"]),
                Id(s["task"] or "-"),
                s["reason"],
            ]
            for s in view["stages"]
        ],
        optional=["TASK", "LEVEL"],
    )


@pipeline_app.command("submit")
def submit(
    ctx: typer.Context,
    file: Path = typer.Option(
        ..., "--file", "-f", help="Pipeline spec, YAML or JSON ('-': stdin)."
    ),
    as_json: bool = JSON,
) -> None:
    """Submit a pipeline (kind: pipeline) from a spec file."""
    view = globals_of(ctx).client().post("/pipelines", _read_spec(file))
    if as_json:
        return print_json(view)
    console.print(f"{view['id']} {view['name'] or ''} {view['state']}".strip(), markup=False)


@pipeline_app.command("list")
def list_pipelines(
    ctx: typer.Context,
    limit: int = typer.Option(100, help="At most this many, newest first."),
    as_json: bool = JSON,
) -> None:
    """Pipelines, newest first, with where each stands."""
    found = globals_of(ctx).client().get("/pipelines", limit=limit)
    if as_json:
        return print_json(found)

    def where(view: dict[str, Any]) -> str:
        live = [s["name"] for s in view["stages"] if s["state"] not in ("done", "waiting")]
        done = sum(s["state"] == "done" for s in view["stages"])
        return f"{done}/{len(view['stages'])} done" + (f"; {', '.join(live)}" if live else "")

    table(
        "Pipelines",
        ["ID", "NAME", "STATE", "STAGES", "CREATED"],
        [
            [Id(v["id"]), v["name"] or "-", v["state"], where(v), ago(v["created_at"])]
            for v in found
        ],
        optional=["CREATED"],
    )


@pipeline_app.command("get")
def get(
    ctx: typer.Context, ref: str = typer.Argument(..., help="Id or name."), as_json: bool = JSON
) -> None:
    """A pipeline's stages: state, attempts, failure level, time taken, reason."""
    view = globals_of(ctx).client().get(f"/pipelines/{ref}")
    if as_json:
        return print_json(view)
    _show(view)


@pipeline_app.command("logs")
def logs(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="Id or name."),
    stage: str = typer.Argument(..., help="The stage whose latest run to show."),
) -> None:
    """Print the output of a stage's latest run."""
    client = globals_of(ctx).client()
    offset = 0
    while True:
        page = client.response(
            "GET", f"/pipelines/{ref}/logs", params={"stage": stage, "offset": offset}
        )
        if not page.content:
            return
        sys.stdout.buffer.write(page.content)
        sys.stdout.flush()
        offset = int(page.headers["X-Log-Next"])


def _act(ctx: typer.Context, path: str, as_json: bool, **params: Any) -> None:
    view = globals_of(ctx).client().post(path, **{k: v for k, v in params.items() if v})
    if as_json:
        return print_json(view)
    _show(view)


@pipeline_app.command("pause")
def pause(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="Id or name."),
    stop: bool = typer.Option(
        False, "--stop", help="Stop running stages too (they run again on resume)."
    ),
    as_json: bool = JSON,
) -> None:
    """Start no more stages; running ones finish (or stop, with --stop)."""
    _act(ctx, f"/pipelines/{ref}/pause", as_json, stop="true" if stop else None)


@pipeline_app.command("resume")
def resume(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="Id or name."),
    from_stage: str | None = typer.Option(
        None, "--from", help="Run this stage and every one after it again."
    ),
    as_json: bool = JSON,
) -> None:
    """Run a paused pipeline again: its failed stages, or from a chosen stage."""
    _act(ctx, f"/pipelines/{ref}/resume", as_json, **{"from": from_stage})


@pipeline_app.command("cancel")
def cancel(
    ctx: typer.Context, ref: str = typer.Argument(..., help="Id or name."), as_json: bool = JSON
) -> None:
    """Stop a pipeline's stages and end it."""
    _act(ctx, f"/pipelines/{ref}/cancel", as_json)


@pipeline_app.command("signal")
def signal(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="Id or name."),
    stage: str = typer.Argument(..., help="A `wait: {signal: true}` stage."),
    as_json: bool = JSON,
) -> None:
    """End a stage that waits for a signal."""
    _act(ctx, f"/pipelines/{ref}/signal", as_json, stage=stage)


@pipeline_app.command("flush")
def flush(
    ctx: typer.Context,
    stage: str = typer.Argument(..., help="A batched stage."),
    as_json: bool = JSON,
) -> None:
    """Run the pipelines waiting in a batched stage now, however few."""
    done = globals_of(ctx).client().post(f"/pipeline-batches/{stage}/flush")
    if as_json:
        return print_json(done)
    console.print(f"{stage}: {done['flushed']} pipeline(s) flushed")
