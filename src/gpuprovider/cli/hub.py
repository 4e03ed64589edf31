"""`gpuprovider hub ...`: run the reference hub, and use it as a tenant (or as its
operator). A tenant's requests are signed with `tenant.key` in the home."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import httpx
import typer
import uvicorn

from gpuprovider.cli.client import CliError
from gpuprovider.cli.common import JSON, globals_of
from gpuprovider.cli.output import Id, console, print_json, table
from gpuprovider.home import Home, write_secret
from gpuprovider.hub.app import create_app
from gpuprovider.hub.hub import Hub, HubSettings
from gpuprovider.hub.store import HubStore
from gpuprovider.identity.keys import create_node_key, load_node_key, new_token, public_key_hex
from gpuprovider.market.client import HubClient, MarketRefused, MarketUnreachable
from gpuprovider.market.model import MAX_MONEY, MICROS, fmt_money

hub_app = typer.Typer(help="The reference market hub: serve it, or use it.", no_args_is_help=True)

HUB_DIR = typer.Option(
    Path("~/.gpuprovider-hub"),
    "--dir",
    envvar="GPUPROVIDER_HUB_HOME",
    help="The hub's folder: database, keys, admin token ($GPUPROVIDER_HUB_HOME).",
)
HUB_URL = typer.Argument(..., help="The hub's URL, e.g. http://127.0.0.1:8090")


def _key(path: Path):
    if path.exists():
        return load_node_key(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return create_node_key(path)


def _admin_token(folder: Path) -> str:
    path = folder / "admin.token"
    if not path.exists():
        write_secret(path, new_token().encode())
    return path.read_text().strip()


MAX_HOURLY = 10_000  # currency units an hour: more than any GPU order pays


def _money(value: float, what: str) -> int:
    """Currency units as micros, or exit 2 naming the value (nan, inf, 0, negative or
    more than any order may hold)."""
    if not (math.isfinite(value) and 0 < value <= MAX_MONEY / MICROS):
        raise CliError(
            f"{what} {value!r}: give a positive amount of currency units, at most "
            f"{MAX_MONEY // MICROS:,}",
            2,
        )
    micros = round(value * MICROS)
    if micros <= 0:
        raise CliError(f"{what} {value!r} is less than one micro (0.000001)", 2)
    return micros


@hub_app.command("serve")
def serve(
    folder: Path = HUB_DIR,
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8090, "--port", min=1, max=65535),
    db: str = typer.Option("", "--db", help="SQLAlchemy URL; default SQLite in --dir."),
    auction_window_s: float = typer.Option(2.0, "--auction-window-s", min=0.05, max=3600),
    dispatch_timeout_s: float = typer.Option(10.0, "--dispatch-timeout-s", min=0.1, max=3600),
    heartbeat_s: float = typer.Option(10.0, "--heartbeat-s", min=0.1, max=3600),
    rechallenge_s: float = typer.Option(3600.0, "--rechallenge-s", min=1, max=365 * 86400),
    reliability_floor: float = typer.Option(0.5, "--reliability-floor", min=0, max=1),
    allow_simulated: bool = typer.Option(
        False, "--allow-simulated", help="Admit providers whose GPUs are simulated (demos, tests)."
    ),
    allow_estimated: bool = typer.Option(
        False,
        "--allow-estimated-calibration",
        help="Admit real GPUs of models with no measured walk time, timed against their "
        "published bandwidth (labelled estimated).",
    ),
) -> None:
    """Run the hub until stopped; prints its verifier key and where its admin token is."""
    folder = folder.expanduser()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    verifier = _key(folder / "verifier.key")
    token = _admin_token(folder)
    settings = HubSettings(
        auction_window_s=auction_window_s,
        dispatch_timeout_s=dispatch_timeout_s,
        reliability_floor=reliability_floor,
        heartbeat_s=heartbeat_s,
        rechallenge_s=rechallenge_s,
        allow_simulated=allow_simulated,
        allow_estimated_calibration=allow_estimated,
    )
    hub = Hub(HubStore(db or f"sqlite:///{folder / 'hub.db'}"), settings, verifier)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    console.print(f"hub verifier key {public_key_hex(verifier)}  (providers trust it)")
    console.print(f"hub admin token in {folder / 'admin.token'}")
    console.print(f"hub listening on http://{host}:{port}")
    uvicorn.run(
        create_app(hub, token),
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=2,  # event streams never end on their own
    )


@hub_app.command("key")
def show_key(folder: Path = HUB_DIR) -> None:
    """Print the hub's verifier key (made on first use)."""
    print(public_key_hex(_key(folder.expanduser() / "verifier.key")))


def _tenant(ctx: typer.Context, url: str) -> HubClient:
    home: Home = globals_of(ctx).home
    return HubClient(url, _key(home.root / "tenant.key"))


def _call(client: HubClient, method: str, path: str, body: Any = None) -> Any:
    try:
        return client.call(method, path, body)
    except MarketUnreachable as exc:
        raise CliError(str(exc)) from None
    except MarketRefused as exc:
        raise CliError(str(exc), 2 if exc.status == 422 else 1) from None


@hub_app.command("register")
def register(ctx: typer.Context, url: str = HUB_URL, name: str = typer.Argument(...)) -> None:
    """Register this home's tenant key with the hub under NAME."""
    made = _call(_tenant(ctx, url), "POST", "/v1/tenants", {"name": name})
    console.print(f"tenant {made['name']} registered, key {made['key']}")


@hub_app.command("deposit")
def deposit(
    url: str = HUB_URL,
    tenant: str = typer.Argument(..., help="The tenant's name or key."),
    amount: float = typer.Argument(..., help="Currency units (USD on the reference hub)."),
    folder: Path = HUB_DIR,
) -> None:
    """Credit a tenant (the hub operator's command: needs the hub's admin token)."""
    micros = _money(amount, "amount")
    path = folder.expanduser() / "admin.token"
    try:
        token = path.read_text().strip()
    except OSError:
        raise CliError(
            f"no hub admin token at {path}: `gpuprovider hub serve` makes it in its folder "
            "(give that folder with --dir or $GPUPROVIDER_HUB_HOME)",
            2,
        ) from None
    answer = httpx.post(
        url.rstrip("/") + "/v1/admin/deposit",
        json={"tenant": tenant, "amount": micros},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    if answer.status_code >= 400:
        raise CliError(f"hub: {answer.status_code} {answer.text}")
    console.print(f"{tenant} balance {fmt_money(answer.json()['balance'])}")


@hub_app.command("order")
def order(
    ctx: typer.Context,
    url: str = HUB_URL,
    spec: Path = typer.Argument(..., help="An order as JSON: resources, max_price_per_hour, ..."),
    deposit: float = typer.Option(..., "--deposit", help="Currency units held in escrow."),
    dispatch: bool = typer.Option(False, "--dispatch", help="Let the hub pick the provider."),
    as_json: bool = JSON,
) -> None:
    """Post an order; the hub matches it and the deposit pays the lease as it runs."""
    try:
        body = json.loads(spec.read_text())
    except (OSError, ValueError) as exc:
        raise CliError(f"{spec}: {exc}", 2) from None
    if not isinstance(body, dict):
        raise CliError(f"{spec}: an order is a JSON object", 2)
    price = body.get("max_price_per_hour")
    if not isinstance(price, int | float) or isinstance(price, bool):
        raise CliError(
            f"{spec}: max_price_per_hour: the most the order pays per hour, in currency "
            "units (e.g. 2.5)",
            2,
        )
    if price > MAX_HOURLY:
        raise CliError(
            f"{spec}: max_price_per_hour {price:g} is in currency units per hour (e.g. 2.5 "
            f"for 2.50 an hour); more than {MAX_HOURLY:,} looks like micros",
            2,
        )
    body["max_price_per_hour"] = _money(float(price), "max_price_per_hour")
    made = _call(
        _tenant(ctx, url),
        "POST",
        "/v1/orders",
        {
            "order": body,
            "deposit": _money(deposit, "--deposit"),
            "mode": "dispatch" if dispatch else "auction",
        },
    )
    if as_json:
        print_json(made)
    else:
        console.print(f"order {made['id']} {made['state']} ({made['mode']})")


@hub_app.command("orders")
def orders(ctx: typer.Context, url: str = HUB_URL, as_json: bool = JSON) -> None:
    """Your orders (as a tenant): matched, or unmatched and why."""
    rows = _call(_tenant(ctx, url), "GET", "/v1/orders")
    if as_json:
        print_json(rows)
        return
    table(
        "Orders",
        ["ORDER", "STATE", "MODE", "DEPOSIT", "WHY"],
        [[Id(o["id"]), o["state"], o["mode"], fmt_money(o["deposit"]), o["reason"]] for o in rows],
    )


@hub_app.command("leases")
def leases(ctx: typer.Context, url: str = HUB_URL, as_json: bool = JSON) -> None:
    """Your leases (as a tenant) on the hub."""
    rows = _call(_tenant(ctx, url), "GET", "/v1/leases")
    if as_json:
        print_json(rows)
        return
    table(
        "Leases",
        [
            "LEASE",
            "STATE",
            "PRICE/H",
            "GPUS",
            "BILLED S",
            "CHARGED",
            "ESCROW",
            "ENDPOINT",
            "CLOSED",
        ],
        [
            [
                Id(lease["id"]),
                lease["state"],
                fmt_money(lease["price_per_hour"]),
                f"{lease['gpus']:g}",
                f"{lease['billed_s']:.1f}",
                fmt_money(lease["charged"]),
                fmt_money(lease["escrow"]),
                lease["endpoint"],
                lease["close_reason"],
            ]
            for lease in rows
        ],
    )


@hub_app.command("close")
def close(ctx: typer.Context, url: str = HUB_URL, lease: str = typer.Argument(...)) -> None:
    """Close a lease: billing stops now and the rest of the deposit comes back."""
    made = _call(_tenant(ctx, url), "POST", f"/v1/leases/{lease}/close")
    console.print(f"lease {made['id']} {made['state']}")


@hub_app.command("lease")
def lease(
    ctx: typer.Context,
    url: str = HUB_URL,
    lease_id: str = typer.Argument(..., metavar="LEASE", help="The order's id (ord-...)."),
    as_json: bool = JSON,
) -> None:
    """One of your leases: where to reach it and the token that calls it (a service's),
    what it cost, how it ended."""
    found = next(
        (x for x in _call(_tenant(ctx, url), "GET", "/v1/leases") if x["id"] == lease_id), None
    )
    if found is None:
        raise CliError(f"no lease {lease_id} of yours; `hub leases` lists them", 2)
    if as_json:
        print_json(found)
        return
    console.print(f"lease {found['id']} {found['state']}", highlight=False)
    console.print(f"  price    {fmt_money(found['price_per_hour'])}/h", highlight=False)
    console.print(
        f"  charged  {fmt_money(found['charged'])} for {found['billed_s']:.0f} s "
        f"(escrow left {fmt_money(found['escrow'])})",
        highlight=False,
    )
    if found["endpoint"]:
        console.print(f"  endpoint {found['endpoint']}", highlight=False, soft_wrap=True)
    if found["access_token"]:
        console.print(f"  token    {found['access_token']}", highlight=False, soft_wrap=True)
        console.print(  # on lines that fit 80 columns, ready to paste
            f"  call it:\n    curl --oauth2-bearer {found['access_token']} \\\n"
            f"      {found['endpoint']}",
            highlight=False,
            soft_wrap=True,
        )
    if found["close_reason"]:
        console.print(
            f"  closed   {found['close_reason']}: {found['close_detail']}",
            highlight=False,
            soft_wrap=True,
        )


@hub_app.command("logs")
def logs(
    ctx: typer.Context,
    url: str = HUB_URL,
    order_id: str = typer.Argument(..., metavar="ORDER", help="The order's id (ord-...)."),
    as_json: bool = JSON,
) -> None:
    """What happened to an order and its lease, each change with its reason, and the
    end of its work's output as the provider sent it when the lease closed."""
    history = _call(_tenant(ctx, url), "GET", f"/v1/history/{order_id}")
    if as_json:
        print_json(history)
        return
    for row in history["journal"]:
        change = row["to"] if row["from"] in (None, row["to"]) else f"{row['from']} -> {row['to']}"
        console.print(f"{row['kind']:5} {change}: {row['reason']}", highlight=False, soft_wrap=True)
    lease_view = history.get("lease") or {}
    if lease_view.get("log_tail"):
        console.print("--- the end of its output ---", highlight=False)
        sys.stdout.write(lease_view["log_tail"])
        if not lease_view["log_tail"].endswith("\n"):
            sys.stdout.write("\n")


@hub_app.command("me")
def me(ctx: typer.Context, url: str = HUB_URL, as_json: bool = JSON) -> None:
    """This home's tenant on the hub: status and balance."""
    made = _call(_tenant(ctx, url), "GET", "/v1/me")
    if as_json:
        print_json(made)
    else:
        console.print(f"{made['kind']} {made['name']}: balance {fmt_money(made['balance'])}")
