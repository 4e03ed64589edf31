"""`gpuprovider hub ...`: run the reference hub, and use it as a tenant (or as its
operator). A tenant's requests are signed with `tenant.key` in the home."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx
import typer
import uvicorn

from gpuprovider.cli.client import CliError
from gpuprovider.cli.common import JSON, globals_of
from gpuprovider.cli.output import console, print_json, table
from gpuprovider.home import Home, write_secret
from gpuprovider.hub.app import create_app
from gpuprovider.hub.hub import Hub, HubSettings
from gpuprovider.hub.store import HubStore
from gpuprovider.identity.keys import create_node_key, load_node_key, new_token, public_key_hex
from gpuprovider.market.client import HubClient, MarketRefused, MarketUnreachable
from gpuprovider.market.model import fmt_money

hub_app = typer.Typer(help="The reference market hub: serve it, or use it.", no_args_is_help=True)

HUB_DIR = typer.Option(
    Path("~/.gpuprovider-hub"), "--dir", help="The hub's folder: database, keys, admin token."
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
    token = (folder.expanduser() / "admin.token").read_text().strip()
    answer = httpx.post(
        url.rstrip("/") + "/v1/admin/deposit",
        json={"tenant": tenant, "amount": round(amount * 1_000_000)},
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
    made = _call(
        _tenant(ctx, url),
        "POST",
        "/v1/orders",
        {
            "order": body,
            "deposit": round(deposit * 1_000_000),
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
        [[o["id"], o["state"], o["mode"], fmt_money(o["deposit"]), o["reason"]] for o in rows],
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
                lease["id"],
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


@hub_app.command("me")
def me(ctx: typer.Context, url: str = HUB_URL, as_json: bool = JSON) -> None:
    """This home's tenant on the hub: status and balance."""
    made = _call(_tenant(ctx, url), "GET", "/v1/me")
    if as_json:
        print_json(made)
    else:
        console.print(f"{made['kind']} {made['name']}: balance {fmt_money(made['balance'])}")
