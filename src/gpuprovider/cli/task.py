"""`gpuprovider task ...`: submit, list, inspect, follow and cancel tasks."""

from __future__ import annotations

import json
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.markup import escape

from gpuprovider.cli import pack, sources
from gpuprovider.cli.client import Client, CliError
from gpuprovider.cli.common import JSON, globals_of
from gpuprovider.cli.output import Id, ago, console, errors, print_json, table

MAX_SPEC_BYTES = 1 << 20  # as the API's default body limit
task_app = typer.Typer(help="Batch jobs and services.", no_args_is_help=True)
NEVER_FITS = 3  # --dry-run: no node could ever run it
DRY_RUN = typer.Option(
    False,
    "--dry-run",
    help="Say where it would run; store nothing. Exit 0 if it would run or wait, 3 if never.",
)


def _pairs(items: list[str], what: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"{what} {item!r} must be KEY=VALUE", 2)
        pairs[key] = value
    return pairs


UPLOAD_TRIES = 3


def send_folder(client: Client, folder: Path) -> str:
    """The folder's upload reference (sha256:...), sent unless the provider has it."""
    try:
        entries = pack.listing(folder)
    except pack.PackError as exc:
        raise CliError(f"--upload: {exc}", 2) from None
    except OSError as exc:
        raise CliError(f"--upload: cannot read {exc.filename}: {exc.strerror}", 2) from None
    key = pack.listing_key(folder, entries)
    sha = pack.remembered(key)
    if sha and client.response_or_none("GET", f"/uploads/sha256:{sha}") is not None:
        return f"sha256:{sha}"
    archive = pack.temporary_archive()
    try:
        try:
            sha = pack.pack(entries, archive)
        except OSError as exc:
            raise CliError(f"--upload: cannot read {exc.filename}: {exc.strerror}", 2) from None
        if client.response_or_none("GET", f"/uploads/sha256:{sha}") is None:
            client.put_file(f"/uploads/sha256:{sha}", archive, UPLOAD_TRIES)
    finally:
        archive.unlink(missing_ok=True)
    pack.remember(key, sha)
    return f"sha256:{sha}"


def send_source(client: Client, text: str) -> str:
    """`--upload`'s reference: a folder, `git:URL@REV`, or an http(s) tar archive with
    its checksum, fetched here and sent as a folder."""
    if not sources.is_remote(text):
        return send_folder(client, Path(text).expanduser())
    key = sources.immutable_key(text)
    sha = pack.remembered(key) if key else None
    if sha and client.response_or_none("GET", f"/uploads/sha256:{sha}") is not None:
        return f"sha256:{sha}"
    with tempfile.TemporaryDirectory(prefix="gpuprovider-source-") as folder:
        try:
            if text.startswith("git:"):
                sources.fetch_git(text, Path(folder))
            else:
                sources.fetch_archive(text, Path(folder))
        except sources.SourceError as exc:
            raise CliError(f"--upload: {exc}", 2) from None
        ref = send_folder(client, Path(folder))
    if key:
        pack.remember(key, ref.removeprefix("sha256:"))
    return ref


def _submit(ctx: typer.Context, spec: dict[str, Any], dry_run: bool, as_json: bool) -> None:
    client = globals_of(ctx).client()
    upload = spec.get("upload")
    if isinstance(upload, str) and not upload.startswith("sha256:"):
        spec["upload"] = send_source(client, upload)
    if dry_run:
        verdict = client.post("/tasks", spec, dry_run="true")
        if as_json:
            print_json(verdict)
        elif verdict["placeable_now"]:
            p = verdict["placement"]
            console.print(f"would run now on node {p['node_id']} with GPUs {p['gpu_uuids'] or '-'}")
        else:
            console.print(verdict["message"])
        if not (verdict["placeable_now"] or verdict["would_wait"]):
            raise typer.Exit(NEVER_FITS)
        return
    task = client.submit(spec)
    if as_json:
        return print_json(task)
    console.print(f"{task['id']} {task['name'] or ''} {task['state']}".strip())
    if service := task.get("service"):
        console.print(f"service {service['name']}: {'  '.join(service['urls'])}")


def _autoscale(text: str) -> dict[str, Any]:
    """`1:4:inflight=2` or `1:4:rps=10` -> the spec's autoscale block."""
    parts = text.split(":")
    if len(parts) != 3 or "=" not in parts[2]:
        raise CliError(f"--autoscale {text!r}: write MIN:MAX:inflight=N or MIN:MAX:rps=N", 2)
    kind, _, target = parts[2].partition("=")
    key = {"inflight": "target_in_flight", "rps": "target_rps"}.get(kind)
    if key is None:
        raise CliError(f"--autoscale {text!r}: the target is inflight=N or rps=N", 2)
    try:
        return {"min": int(parts[0]), "max": int(parts[1]), key: float(target)}
    except ValueError:
        raise CliError(f"--autoscale {text!r}: MIN, MAX and N are numbers", 2) from None


@task_app.command(
    "run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def run(
    ctx: typer.Context,
    command: list[str] = typer.Argument(None, help="Program and arguments, after --."),
    name: str | None = typer.Option(None, help="Name, unique among your live tasks."),
    gpu: str = typer.Option("0", help="GPUs: 1, 0.5, H100:80GB:2, A100|H100:1, 24GB..:1"),
    cpu: float = typer.Option(0.0, help="CPU cores to reserve."),
    memory: str | None = typer.Option(None, help="Memory to reserve, e.g. 16GB."),
    kind: str = typer.Option("job", help="job or service."),
    port: list[str] = typer.Option([], help="Named port for a service (repeatable)."),
    env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE (repeatable)."),
    workdir: str | None = typer.Option(None, help="Absolute working directory."),
    image: str | None = typer.Option(None, help="Container image (needs docker or podman)."),
    upload: str | None = typer.Option(
        None,
        help="A folder sent to the task's work folder (.gitignore and .gpuproviderignore "
        "respected; an unchanged folder is not sent again), git:URL@REV, or "
        "https://…/code.tar.gz#sha256=HEX.",
    ),
    volume: list[str] = typer.Option(
        [], help="NAME:PATH: mount your volume NAME at PATH (repeatable)."
    ),
    max_duration: float | None = typer.Option(None, help="Seconds before it is stopped."),
    attempts: int = typer.Option(1, help="Total attempts on failure."),
    backoff: float = typer.Option(1.0, help="Seconds before the first retry (doubles)."),
    priority: int = typer.Option(0, help="Higher runs first."),
    preemptible: bool = typer.Option(False, help="May be evicted by higher priority work."),
    label: list[str] = typer.Option([], help="KEY=VALUE (repeatable)."),
    replicas: int | None = typer.Option(None, help="A service's replicas."),
    autoscale: str | None = typer.Option(
        None, help="A service's replicas by load: MIN:MAX:inflight=N or MIN:MAX:rps=N."
    ),
    service_name: str | None = typer.Option(
        None, help="A service's name at the gateway (<name>.localhost; a DNS label)."
    ),
    ready_path: str | None = typer.Option(
        None, help="A replica takes traffic once GET PATH answers below 400 (else: TCP)."
    ),
    public: bool = typer.Option(False, help="A service anyone may call, with no token."),
    sticky: bool = typer.Option(False, help="A client keeps its replica (cookie)."),
    dry_run: bool = DRY_RUN,
    as_json: bool = JSON,
) -> None:
    """Submit a task from flags: gpuprovider task run --gpu 1 -- python train.py"""
    spec: dict[str, Any] = {
        "kind": kind,
        "resources": {"gpu": gpu, "cpu": cpu},
        "env": _pairs(env, "--env"),
        "ports": port,
        "retry": {"attempts": attempts, "backoff_s": backoff},
        "priority": priority,
        "preemptible": preemptible,
        "labels": _pairs(label, "--label"),
    }
    if memory is not None:
        spec["resources"]["memory"] = memory
    value: Any
    for key, value in (
        ("name", name),
        ("command", command or None),
        ("image", image),
        ("workdir", workdir),
        ("max_duration_s", max_duration),
        ("upload", upload),
    ):
        if value is not None:
            spec[key] = value
    if volume:
        spec["volumes"] = []
        for item in volume:
            vol_name, sep, path = item.partition(":")
            if not sep or not vol_name or not path:
                raise CliError(f"--volume {item!r} must be NAME:PATH", 2)
            spec["volumes"].append({"name": vol_name, "path": path})
    serve: dict[str, Any] = {}
    for key, value in (
        ("replicas", replicas),
        ("autoscale", _autoscale(autoscale) if autoscale else None),
        ("name", service_name),
        ("readiness", {"path": ready_path} if ready_path else None),
        ("auth", "public" if public else None),
        ("sticky", True if sticky else None),
    ):
        if value is not None:
            serve[key] = value
    if serve:
        spec["serve"] = serve
    _submit(ctx, spec, dry_run, as_json)


@task_app.command("submit")
def submit(
    ctx: typer.Context,
    file: Path = typer.Option(..., "--file", "-f", help="Task spec, YAML or JSON ('-': stdin)."),
    dry_run: bool = DRY_RUN,
    as_json: bool = JSON,
) -> None:
    """Submit a task from a spec file (its `upload: DIR`, relative to the file, is sent
    first)."""
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
        raise CliError(f"{file} nests too deep to be a task spec", 2) from None
    if not isinstance(spec, dict):
        raise CliError(f"{file} must hold a mapping of spec fields, not {type(spec).__name__}", 2)
    upload = spec.get("upload")
    local = isinstance(upload, str) and not upload.startswith("sha256:")
    if local and isinstance(upload, str) and not sources.is_remote(upload) and str(file) != "-":
        spec["upload"] = str(file.parent / Path(upload).expanduser())
    _submit(ctx, spec, dry_run, as_json)


@task_app.command("list")
def list_tasks(
    ctx: typer.Context,
    state: list[str] = typer.Option([], help="Only these states (repeatable)."),
    name: str | None = typer.Option(None),
    limit: int = typer.Option(100, help="At most this many, newest first."),
    as_json: bool = JSON,
) -> None:
    """List tasks, newest first, with why queued ones wait."""
    tasks = globals_of(ctx).client().get("/tasks", state=state or None, name=name, limit=limit)
    if as_json:
        return print_json(tasks)
    rows = [
        [
            Id(t["id"]),
            t["name"],
            t["kind"],
            t["state"],
            Id(t["gpu"]),
            t["attempt"],
            t["exit_code"],
            ago(t["created_at"]),
            t["reason"],
        ]
        for t in tasks
    ]
    columns = ["ID", "NAME", "KIND", "STATE", "GPU", "TRY", "EXIT", "AGE", "REASON"]
    table("Tasks", columns, rows, optional=["KIND", "TRY"])


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="milliseconds") if ts else "-"


@task_app.command("get")
def get(
    ctx: typer.Context, ref: str = typer.Argument(..., help="Id or name."), as_json: bool = JSON
) -> None:
    """Show a task: spec, allocation, events with reasons, exit code."""
    task = globals_of(ctx).client().get(f"/tasks/{ref}")
    if as_json:
        return print_json(task)
    console.print(
        f"[bold]{task['id']}[/] {escape(task['name'] or '')}  {task['kind']}  "
        f"[bold]{task['state']}[/]  {escape(task['reason'])}"
    )
    console.print(
        f"attempt {task['attempt']}  exit code {task['exit_code']}  tenant {task['tenant']}  "
        f"priority {task['priority']}  preempted {task['preemptions']}x"
        + (f"  gang {task['gang']}" if task["gang"] else ""),
        markup=False,
    )
    console.print("spec " + json.dumps(task["spec"]), markup=False)
    alloc = task.get("allocation")
    if alloc:
        gpus = (
            ", ".join(
                f"{g['index']} {g['model']}{' [simulated]' if g['simulated'] else ''}"
                for g in alloc["gpus"]
            )
            or "none"
        )
        share = f" share {alloc['gpu_share']:g}" if alloc["gpus"] and alloc["gpu_share"] < 1 else ""
        console.print(
            f"allocation node {alloc['node']}  GPUs {gpus}{share}  ports "
            f"{alloc['ports'] or '-'}{'' if alloc['active'] else '  (released)'}",
            markup=False,
        )
    if service := task.get("service"):
        console.print(f"service {service['name']}: {'  '.join(service['urls'])}", markup=False)
    for name, url in (task.get("endpoints") or {}).items():
        console.print(f"endpoint {name} {url} (the replica itself)", markup=False)
    table(
        "Events",
        ["AT", "FROM", "TO", "REASON"],
        [[_when(e["at"]), e["from"], e["to"], e["reason"]] for e in task["events"]],
    )


@task_app.command("logs")
def logs(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="Id or name."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the task ends."),
) -> None:
    """Print a task's output (stdout and stderr).

    What the provider keeps of it: the latest `log_max_mib` (in provider.toml)."""
    client = globals_of(ctx).client()
    if follow:
        for event, data in client.stream_events(f"/tasks/{ref}/logs", follow="true"):
            if event == "end":
                return
            if event == "error":
                raise CliError(str(data))
            if event == "skipped":
                errors.print(f"[dim]… {data} bytes dropped by the log's cap …[/dim]")
                continue
            sys.stdout.write(data)
            sys.stdout.flush()
        return
    offset = 0
    while True:  # page by page: the answer is capped, the output need not be
        page = client.response("GET", f"/tasks/{ref}/logs", params={"offset": offset})
        if not page.content:
            return
        start = int(page.headers["X-Log-Start"])
        if start > offset and offset == 0:
            errors.print(f"[dim]… the first {start} bytes were dropped by the log's cap …[/dim]")
        sys.stdout.buffer.write(page.content)
        sys.stdout.flush()
        offset = int(page.headers["X-Log-Next"])


@task_app.command("cancel")
def cancel(
    ctx: typer.Context, ref: str = typer.Argument(..., help="Id or name."), as_json: bool = JSON
) -> None:
    """Cancel a task: SIGTERM, then SIGKILL after the grace period."""
    task = globals_of(ctx).client().post(f"/tasks/{ref}/cancel")
    if as_json:
        return print_json(task)
    console.print(f"{task['id']} {task['state']}")


def _size(size: int) -> str:
    n = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@task_app.command("files")
def files(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="Id or name."),
    path: str = typer.Argument("", help="A folder (or file) in its work folder."),
    as_json: bool = JSON,
) -> None:
    """List what a task has in its work folder (while it runs, and after)."""
    found = globals_of(ctx).client().request("GET", f"/tasks/{ref}/files", params={"path": path})
    if as_json:
        return print_json(found)
    rows = [
        [
            f["name"] + ("/" if f["type"] == "dir" else ""),
            f["type"],
            _size(f["size"]),
            ago(f["mtime"]),
        ]
        for f in found
    ]
    table("Files", ["NAME", "TYPE", "SIZE", "MODIFIED"], rows)


@task_app.command("download")
def download(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="Id or name."),
    path: str = typer.Argument(..., help="A file in its work folder."),
    dest: Path = typer.Argument(..., help="Where to write it ('-': stdout; a folder: into it)."),
) -> None:
    """Fetch a file from a task's work folder, piece by piece."""
    client = globals_of(ctx).client()
    if dest.is_dir():
        dest = dest / Path(path).name
    out = sys.stdout.buffer if str(dest) == "-" else None
    partial = dest.with_name(f".{dest.name}.part") if out is None else None
    try:
        handle = out or open(partial or dest, "wb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise CliError(f"cannot write {dest}: {exc.strerror}", 2) from None
    offset = 0
    try:
        while True:
            page = client.response(
                "GET", f"/tasks/{ref}/download", params={"path": path, "offset": offset}
            )
            handle.write(page.content)
            offset = int(page.headers["X-File-Next"])
            if not page.content or offset >= int(page.headers["X-File-Size"]):
                break
    except BaseException:
        if partial is not None:
            handle.close()
            partial.unlink(missing_ok=True)
        raise
    if partial is not None:
        handle.close()
        partial.replace(dest)
        errors.print(f"{path} -> {dest} ({_size(offset)})")
