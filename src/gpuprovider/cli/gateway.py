"""`gpuprovider gateway` (the router, as `up` starts it), `gateway nginx-config` and
`gateway self-signed`; `gpuprovider service ...`."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import typer
import uvicorn

from gpuprovider.cli.client import CliError
from gpuprovider.cli.common import JSON, globals_of
from gpuprovider.cli.output import Id, ago, console, print_json, table
from gpuprovider.cli.runnable import runnable_config
from gpuprovider.config import ConfigError, GatewayConfig, load_config
from gpuprovider.gateway import nginx
from gpuprovider.gateway.edge import Edge, EdgeHttpProtocol, EdgeLimits, EdgeWebSocketProtocol
from gpuprovider.gateway.router import Router
from gpuprovider.gateway.tls import is_domain, self_signed

gateway_app = typer.Typer(
    help="The gateway: services reachable by name (runs the router without a command).",
    invoke_without_command=True,
)
service_app = typer.Typer(help="Services behind the gateway.", no_args_is_help=True)


@gateway_app.callback()
def gateway(ctx: typer.Context) -> None:
    """Run the router on [gateway] host:port until stopped (`up` starts it itself)."""
    if ctx.invoked_subcommand is not None:
        return
    home = globals_of(ctx).home
    config = runnable_config(home)
    try:
        token = home.gateway_token.read_text().strip()
    except OSError:
        raise CliError(
            f"no {home.gateway_token}: `gpuprovider up` makes it on its first start", 2
        ) from None
    g = config.gateway
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per route fetch
    limits = EdgeLimits(
        max_header_bytes=g.max_header_bytes,
        max_headers=g.max_headers,
        header_timeout_s=g.header_timeout_s,
        keepalive_timeout_s=g.keepalive_timeout_s,
        body_timeout_s=g.body_timeout_s,
        max_connections=g.max_connections,
        max_connections_per_client=g.max_connections_per_client,
        trusted_proxies=frozenset(g.trusted_proxies),
    )
    router = Router(
        f"http://{config.api.host}:{config.api.port}",
        token,
        domain=g.domain,
        read_timeout_s=g.read_timeout_s,
        refresh_s=g.refresh_s,
        trusted_proxies=limits.trusted_proxies,
    )
    edge = Edge.for_process(limits)  # raises the open-file limit, logs what it runs with
    uvicorn.run(
        router,
        host=g.host,
        port=g.port,
        log_level="warning",
        log_config=None,  # keep the logging set up above (httpx quiet)
        access_log=False,
        lifespan="on",
        # uvicorn's own X-Forwarded-* handling would make a caller's claimed address the
        # scope's client before the router sees it: the router decides whom to believe
        proxy_headers=False,
        ssl_certfile=g.tls_cert or None,
        ssl_keyfile=g.tls_key or None,
        # uvicorn's own keep-alive timer; the edge's replaces it (fractions of a second too)
        timeout_keep_alive=max(1, round(g.keepalive_timeout_s)),
        loop="uvloop",
        # httptools with the edge's limits (uvicorn's own bound no header size or count,
        # and time out no request head)
        http=functools.partial(EdgeHttpProtocol, edge=edge),  # type: ignore[arg-type]
        ws=EdgeWebSocketProtocol,
        ws_max_size=64 << 20,
    )


@gateway_app.command("nginx-config")
def nginx_config(
    ctx: typer.Context,
    domain: str = typer.Option(..., help="The wildcard domain: services at <name>.DOMAIN."),
    cert: Path = typer.Option(..., help="The wildcard certificate (PEM, *.DOMAIN)."),
    key: Path = typer.Option(..., help="Its private key (PEM)."),
    router: str | None = typer.Option(None, help="The router's host:port ([gateway] by default)."),
    listen: str = typer.Option("443", help="nginx's TLS listen address."),
    http_listen: str = typer.Option("80", help="Plain HTTP, redirected to HTTPS."),
) -> None:
    """Print an nginx configuration terminating TLS for *.DOMAIN in front of the router,
    with the router's edge limits ([gateway]) set to match."""
    try:
        g = load_config(globals_of(ctx).home.config).gateway
    except ConfigError as exc:
        if router is None:
            raise CliError(str(exc), 2) from None
        g = GatewayConfig.model_validate({})  # no home here: the router's defaults
    if router is None:
        router = f"{g.host}:{g.port}"
    limits = nginx.EdgeSettings(
        max_header_bytes=g.max_header_bytes,
        header_timeout_s=g.header_timeout_s,
        keepalive_timeout_s=g.keepalive_timeout_s,
        body_timeout_s=g.body_timeout_s,
        max_connections_per_client=g.max_connections_per_client,
    )
    try:
        print(
            nginx.render(
                domain,
                cert,
                key,
                router,
                listen,
                http_listen,
                read_timeout_s=g.read_timeout_s,
                edge=limits,
            ),
            end="",
        )
    except ValueError as exc:
        raise CliError(str(exc), 2) from None


@gateway_app.command("self-signed")
def self_signed_pair(
    domain: str = typer.Option("localhost", help="Certificate for *.DOMAIN and DOMAIN."),
    out: Path = typer.Option(Path("."), help="Folder for gateway.crt and gateway.key."),
) -> None:
    """Make a self-signed certificate for development (browsers will warn)."""
    if domain != "localhost" and not is_domain(domain):
        raise CliError(f"--domain {domain!r} is not a domain; write e.g. gpus.example.com", 2)
    out.mkdir(parents=True, exist_ok=True)
    cert, key = out / "gateway.crt", out / "gateway.key"
    self_signed(domain, cert, key)
    console.print(f"wrote {cert} and {key}; set [gateway] tls_cert and tls_key to them")


@service_app.command("list")
def service_list(ctx: typer.Context, as_json: bool = JSON) -> None:
    """Services with their replicas and where they answer."""
    services = globals_of(ctx).client().get("/services")
    if as_json:
        return print_json(services)
    rows = [
        [
            s["name"],
            s["tenant"],
            f"{s['replicas_ready'] if s['replicas_ready'] is not None else '?'}/"
            f"{s['replicas_live']}/{s['replicas_wanted']}",
            s["auth"],
            Id(s["urls"][0]),
        ]
        for s in services
    ]
    table("Services", ["NAME", "TENANT", "READY/LIVE/WANTED", "AUTH", "URL"], rows)


@service_app.command("get")
def service_get(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Service name or id."),
    as_json: bool = JSON,
) -> None:
    """One service: replicas, figures over 30/60/300 s, scaling events."""
    s = globals_of(ctx).client().get(f"/services/{name}")
    if as_json:
        return print_json(s)
    console.print(
        f"[bold]{s['name']}[/] ({s['id']}, tenant {s['tenant']}, {s['state']}, auth {s['auth']})"
    )
    for url in s["urls"]:
        console.print(f"  {url}")
    console.print(f"replicas: {s['replicas_live']} live of {s['replicas_wanted']} wanted")
    if s["autoscale"]:
        console.print(f"autoscale: {s['autoscale']}")
    for r in s["replicas"]:
        console.print(
            f"  {r['name']} {r['task_id']} {r['state']}" + (" draining" if r["draining"] else "")
        )
    if s["stats"]:
        st = s["stats"]
        rows = [
            [
                w,
                st["requests"].get(w),
                st["errors"].get(w),
                st["rps"].get(w),
                st["latency_p50_ms"].get(w),
                st["ttfb_p50_ms"].get(w),
            ]
            for w in ("30s", "60s", "300s")
        ]
        table(
            f"Figures ({st['in_flight']} in flight)",
            ["WINDOW", "REQUESTS", "ERRORS", "RPS", "P50 MS", "TTFB P50 MS"],
            rows,
        )
    for event in s.get("events") or []:
        console.print(f"  {ago(event['at'])}: {event['reason']}")


@service_app.command("scale")
def service_scale(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Service name or id."),
    replicas: int = typer.Argument(..., min=0, max=100, help="Replicas wanted."),
) -> None:
    """Set a service's replica count (extra replicas are drained, then stopped)."""
    s = globals_of(ctx).client().post(f"/services/{name}/scale", {"replicas": replicas})
    console.print(f"service {s['name']}: {s['replicas_wanted']} replicas wanted")


@service_app.command("url")
def service_url(
    ctx: typer.Context, name: str = typer.Argument(..., help="Service name or id.")
) -> None:
    """Where the service answers."""
    for url in globals_of(ctx).client().get(f"/services/{name}")["urls"]:
        print(url)


@service_app.command("stop")
def service_stop(
    ctx: typer.Context, name: str = typer.Argument(..., help="Service name or id.")
) -> None:
    """Stop every replica; the name is free again."""
    s = globals_of(ctx).client().request("DELETE", f"/services/{name}")
    console.print(f"service {s['name']} stopped")
