"""`gpuprovider fleet ...`: GPU servers added, upgraded and removed over SSH."""

from __future__ import annotations

import asyncio
import contextlib
import pwd
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from gpuprovider.cli.client import Client, CliError
from gpuprovider.cli.common import JSON, Globals, globals_of
from gpuprovider.cli.output import ago, console, errors, print_json, table
from gpuprovider.config import RayBackendConfig, load_config
from gpuprovider.fleet import deploy, units
from gpuprovider.fleet.inventory import Host, Inventory, InventoryError, from_targets, load
from gpuprovider.fleet.remote import KnownHosts, RemoteError
from gpuprovider.fleet.wheelhouse import WheelhouseError

fleet_app = typer.Typer(help="GPU servers over SSH: add, upgrade, remove.", no_args_is_help=True)

ACCEPT_NEW = typer.Option(
    False,
    "--accept-new",
    help="Pin the host key of a host never seen before (never a changed one).",
)
WHEELHOUSE = typer.Option(
    None, "--wheelhouse", help="Where wheels are cached (default: the home's fleet/wheels)."
)


class ApiOfProvider:
    """deploy.ProviderApi through the CLI's client."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def _node(self, name: str) -> dict[str, Any] | None:
        return next((n for n in self.client.get("/nodes") if n["name"] == name), None)

    def node_status(self, name: str) -> str | None:
        node = self._node(name)
        return None if node is None else node["status"]

    def drain(self, name: str) -> None:
        self.client.post(f"/nodes/{name}/drain")

    def resume(self, name: str) -> None:
        self.client.post(f"/nodes/{name}/resume")

    def remove(self, name: str) -> None:
        self.client.request("DELETE", f"/nodes/{name}")

    def running_on(self, name: str) -> int:
        node = self._node(name)
        if node is None:
            return 0
        busy = ["scheduled", "starting", "running", "cancelling"]
        return sum(1 for t in self.client.get("/tasks", state=busy) if t["node_id"] == node["id"])


def _paths(g: Globals, wheelhouse: Path | None) -> tuple[Path, KnownHosts, Path]:
    root = g.home.root / "fleet"
    return (wheelhouse or root / "wheels", KnownHosts(root / "known_hosts"), root / "hosts.json")


def _head(g: Globals, given: str | None) -> str:
    if given:
        return given
    try:
        backend = load_config(g.home.config).backend
    except Exception as exc:
        raise CliError(f"name the Ray head with --head (the home's config: {exc})", 2) from None
    if isinstance(backend, RayBackendConfig) and backend.address:
        return backend.address
    raise CliError(
        "name the Ray head with --head HOST:PORT or `head:` in fleet.yaml: the provider's "
        '[backend] is not kind = "ray" with an address',
        2,
    )


def _report(host: str, step: str, status: str, detail: str) -> None:
    mark = {"ok": "[green]ok[/]", "fail": "[red]FAIL[/]", "skip": "skip"}.get(status, status)
    console.print(f"{escape(host)}  {step:<9} {mark}  {escape(detail)}", highlight=False)


def _summary(title: str, outcomes: list[deploy.Outcome]) -> None:
    rows = [
        [
            o.host,
            "ok" if o.ok else "FAILED",
            o.failed_step or "-",
            o.version or "-",
            "yes" if o.started else "no",
            f"{o.seconds:.0f}s",
            o.reason or "-",
        ]
        for o in outcomes
    ]
    table(title, ["HOST", "RESULT", "FAILED AT", "VERSION", "STARTED", "TIME", "WHY"], rows)
    for o in outcomes:
        if not o.ok and o.output:
            errors.print(f"[red]{escape(o.host)}[/] said:", highlight=False)
            errors.print(escape(o.output[-3000:]), highlight=False, soft_wrap=True)


def _run(coroutine: Any) -> Any:
    try:
        return asyncio.run(coroutine)
    except WheelhouseError as exc:
        raise CliError(str(exc)) from None


def _api(g: Globals, wait: bool) -> ApiOfProvider | None:
    return ApiOfProvider(g.client()) if wait else None


def _save(
    records_path: Path,
    hosts: list[Host],
    outcomes: list[deploy.Outcome],
    action: str,
    head: str = "",
) -> None:
    records = deploy.load_records(records_path)
    by_name = {h.name: h for h in hosts}
    for outcome in outcomes:
        deploy.record_outcome(records, by_name[outcome.host], outcome, action)
        if head and outcome.host in records:
            records[outcome.host]["head"] = head  # what upgrade joins it to again
    deploy.save_records(records_path, records)


def _inventory(targets: list[str], file: Path | None, defaults: dict[str, Any]) -> Inventory:
    if bool(targets) == bool(file):
        raise CliError("name hosts (HOST...) or an inventory (-f fleet.yaml), one of them", 2)
    try:
        return load(file) if file else from_targets(targets, defaults)
    except InventoryError as exc:
        raise CliError(str(exc), 2) from None


@fleet_app.command("add")
def fleet_add(
    ctx: typer.Context,
    targets: list[str] = typer.Argument(None, help="Hosts: [user@]host[:port]."),
    file: Path | None = typer.Option(None, "-f", "--file", help="An inventory (fleet.yaml)."),
    head: str | None = typer.Option(None, help="The Ray head's host:port, as hosts reach it."),
    key: str | None = typer.Option(None, help="Private key for hosts named here."),
    label: list[str] = typer.Option([], "--label", help="KEY=VALUE for hosts named here."),
    simulate_gpu: list[str] = typer.Option([], "--simulate-gpu", help="MODEL:COUNT, test hosts."),
    accept_new: bool = ACCEPT_NEW,
    parallel: int = typer.Option(8, min=1, max=256, help="Hosts at once."),
    check: bool = typer.Option(False, "--check", help="Only check the hosts; install nothing."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until each node is ready."),
    ready_timeout: float = typer.Option(180.0, help="Seconds to wait for `ready`."),
    wheelhouse: Path | None = WHEELHOUSE,
) -> None:
    """Make hosts nodes: check, install this provider's versions, a systemd unit, ready."""
    g = globals_of(ctx)
    defaults: dict[str, Any] = {"labels": dict(_label(x) for x in label)}
    if key:
        defaults["key"] = key
    if simulate_gpu:
        defaults["simulate_gpus"] = simulate_gpu
    inventory = _inventory(targets or [], file, defaults)
    wheels, known, records = _paths(g, wheelhouse)
    plan = deploy.Plan(
        head=_head(g, head or inventory.head),
        known=known,
        accept_new=accept_new,
        wheel_dir=wheels,
        api=_api(g, wait and not check),
        check_only=check,
        ready_timeout_s=ready_timeout,
    )
    started = time.monotonic()
    outcomes = _run(
        deploy.run_all(inventory.hosts, parallel, lambda h: deploy.add_host(h, plan, _report))
    )
    _save(records, inventory.hosts, outcomes, "check" if check else "add", plan.head)
    what = "checked" if check else "added"
    _summary(f"Fleet: {what} in {time.monotonic() - started:.0f}s", outcomes)
    if not all(o.ok for o in outcomes):
        raise typer.Exit(1)


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise CliError(f"--label {text!r}: write KEY=VALUE", 2)
    return key, value


def _known_hosts(g: Globals, names: list[str]) -> list[Host]:
    _, _, records_path = _paths(g, None)
    records = deploy.load_records(records_path)
    missing = [n for n in names if n not in records]
    if missing:
        known = ", ".join(sorted(records)) or "none yet"
        raise CliError(f"not in the fleet: {', '.join(missing)} (the fleet: {known})", 2)
    return [deploy.host_from_record(records[n]["host"]) for n in names]


@fleet_app.command("list")
def fleet_list(ctx: typer.Context, as_json: bool = JSON) -> None:
    """The fleet's hosts: address, state, version, last contact (and node status)."""
    g = globals_of(ctx)
    _, _, records_path = _paths(g, None)
    records = deploy.load_records(records_path)
    statuses: dict[str, str] = {}
    # the provider down: the fleet's own record still says something
    with contextlib.suppress(CliError):
        statuses = {n["name"]: n["status"] for n in g.client().get("/nodes")}
    if as_json:
        return print_json(
            [{"name": n, **r, "node_status": statuses.get(n)} for n, r in sorted(records.items())]
        )
    rows = [
        [
            name,
            f"{r['host']['user']}@{r['host']['address']}:{r['host']['port']}",
            r.get("state", "-"),
            statuses.get(name, "-"),
            r.get("version") or "-",
            ago(r.get("last_contact")),
        ]
        for name, r in sorted(records.items())
    ]
    table("Fleet", ["NAME", "HOST", "STATE", "NODE", "VERSION", "CONTACT"], rows)


@fleet_app.command("upgrade")
def fleet_upgrade(
    ctx: typer.Context,
    names: list[str] = typer.Argument(None, help="Hosts of the fleet (default: every one)."),
    file: Path | None = typer.Option(None, "-f", "--file", help="An inventory (fleet.yaml)."),
    head: str | None = typer.Option(None, help="The Ray head's host:port, as hosts reach it."),
    max_unavailable: int = typer.Option(1, min=1, help="Nodes out of service at once."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Drain and wait for ready."),
    drain_timeout: float = typer.Option(3600.0, help="Seconds for a node's tasks to finish."),
    ready_timeout: float = typer.Option(180.0, help="Seconds to wait for `ready`."),
    accept_new: bool = ACCEPT_NEW,
    wheelhouse: Path | None = WHEELHOUSE,
) -> None:
    """Rolling: drain a node, install this provider's versions, restart, ready, next."""
    g = globals_of(ctx)
    if file:
        hosts = _inventory([], file, {}).hosts
        if names:
            hosts = [h for h in hosts if h.name in names]
        head = head or load(file).head
    else:
        _, _, records_path = _paths(g, None)
        known_records = deploy.load_records(records_path)
        hosts = _known_hosts(g, names or sorted(known_records))
        heads = {known_records[h.name].get("head") for h in hosts} - {None}
        if head is None and len(heads) == 1:
            head = heads.pop()
    if not hosts:
        raise CliError("no host to upgrade: `gpuprovider fleet add` first", 2)
    wheels, known, records = _paths(g, wheelhouse)
    plan = deploy.Plan(
        head=_head(g, head),
        known=known,
        accept_new=accept_new,
        wheel_dir=wheels,
        api=_api(g, wait),
        ready_timeout_s=ready_timeout,
        drain_timeout_s=drain_timeout,
    )
    started = time.monotonic()
    outcomes = _run(
        deploy.rolling(
            hosts, max_unavailable, lambda h: deploy.add_host(h, plan, _report, upgrade=True)
        )
    )
    _save(records, hosts, [o for o in outcomes if o.seconds or o.ok], "upgrade", plan.head)
    _summary(f"Fleet: upgraded in {time.monotonic() - started:.0f}s", outcomes)
    if not all(o.ok for o in outcomes):
        raise typer.Exit(1)


@fleet_app.command("remove")
def fleet_remove(
    ctx: typer.Context,
    names: list[str] = typer.Argument(..., help="Hosts of the fleet."),
    purge: bool = typer.Option(False, "--purge", help="Delete the node's venv and wheels too."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Drain and forget the node."),
    drain_timeout: float = typer.Option(3600.0, help="Seconds for a node's tasks to finish."),
) -> None:
    """Drain the node, stop and disable its unit, remove it from the pool."""
    g = globals_of(ctx)
    hosts = _known_hosts(g, names)
    wheels, known, records = _paths(g, None)
    plan = deploy.Plan(
        head="", known=known, accept_new=False, wheel_dir=wheels, api=_api(g, wait),
        drain_timeout_s=drain_timeout,
    )  # fmt: skip
    outcomes = _run(deploy.run_all(hosts, 8, lambda h: deploy.remove_host(h, plan, _report, purge)))
    _save(records, hosts, outcomes, "remove")
    _summary("Fleet: removed", outcomes)
    if not all(o.ok for o in outcomes):
        raise typer.Exit(1)


@fleet_app.command(
    "exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def fleet_exec(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="A host of the fleet."),
    command: list[str] = typer.Argument(..., help="The command, after `--`."),
) -> None:
    """Run a command on a host (each word quoted, no shell) and show its output."""
    g = globals_of(ctx)
    (host,) = _known_hosts(g, [name])
    wheels, known, _ = _paths(g, None)
    plan = deploy.Plan(head="", known=known, accept_new=False, wheel_dir=wheels)
    try:
        status, out, err = asyncio.run(deploy.exec_on(host, plan, command))
    except RemoteError as exc:
        raise CliError(str(exc)) from None
    sys.stdout.write(out)
    sys.stderr.write(err)
    raise typer.Exit(status)


def install_service(
    ctx: typer.Context,
    user: str = typer.Option("root", help="Run the daemon as this user (see the README)."),
    hub: bool = typer.Option(False, "--hub", help="The hub's unit (`hub serve`) instead."),
    hub_home: Path = typer.Option(Path("~/.gpuprovider-hub"), help="The hub's folder, with --hub."),
    unit_dir: Path = typer.Option(Path("/etc/systemd/system"), help="Where units go."),
    start: bool = typer.Option(True, "--start/--no-start", help="Enable and start it now."),
    show: bool = typer.Option(False, "--print", help="Print the unit; write nothing."),
) -> None:
    """Run the provider daemon (or the hub) as a systemd service, restarted and at boot."""
    g = globals_of(ctx)
    executable = str(Path(sys.argv[0]).absolute())
    if not Path(executable).name.startswith("gpuprovider"):
        executable = str(Path(sys.executable).parent / "gpuprovider")
    home = str((hub_home.expanduser() if hub else g.home.root).absolute())
    for what, value in (("--user", user), ("home", home), ("executable", executable)):
        if not re.fullmatch(SAFE, value):
            raise CliError(f"{what} {value!r}: use letters, digits and . _ / + - only", 2)
    if user != "root":
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise CliError(
                f"no user {user!r}: sudo useradd --system --create-home --home-dir "
                f"/var/lib/gpuprovider --shell /usr/sbin/nologin {user}",
                2,
            ) from None
    name = units.HUB_UNIT if hub else units.PROVIDER_UNIT
    text = units.provider_unit(executable, home, user, hub=hub)
    clean, said = units.verify(text, name)
    if not clean:
        raise CliError(f"systemd-analyze verify found faults in {name}:\n{said}")
    if show:
        print(text, end="")
        return
    path = unit_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    console.print(f"wrote {path}" + (f" ({said})" if said else " (systemd-analyze verify: clean)"))
    booted = Path("/run/systemd/system").is_dir() and str(unit_dir) == "/etc/systemd/system"
    if not start:
        return
    if not booted:
        wants = unit_dir / "multi-user.target.wants"
        wants.mkdir(exist_ok=True)
        link = wants / name
        link.unlink(missing_ok=True)
        link.symlink_to(f"../{name}")
        console.print(f"enabled ({link}); NOT started: systemd does not run here")
        return
    for argv in (["daemon-reload"], ["enable", "--now", name]):
        done = subprocess.run(["systemctl", *argv], capture_output=True, text=True)
        if done.returncode != 0:
            raise CliError(f"systemctl {' '.join(argv)}: {(done.stderr or done.stdout).strip()}")
    console.print(f"enabled and started: systemctl status {name}; journalctl -u {name}")


SAFE = r"[A-Za-z0-9._/+-]+"
