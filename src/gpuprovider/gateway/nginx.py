"""`gpuprovider gateway nginx-config`: nginx in front of the router for a wildcard domain,
from a Jinja2 template (the Swan pattern: one `server_name *.<domain>` block, the
operator's wildcard certificate)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined

from gpuprovider.gateway.tls import certificate_names, is_domain

_UNSAFE = re.compile(r"[\s;{}#'\"\\$]")
_TEMPLATES = Environment(
    loader=PackageLoader("gpuprovider.gateway", "templates"),
    undefined=StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,  # nginx configuration, not HTML
)


@dataclass(frozen=True)
class EdgeSettings:
    """The router's edge limits ([gateway]), which nginx in front applies first."""

    max_header_bytes: int = 32768
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 75.0
    body_timeout_s: float = 60.0
    max_connections_per_client: int = 256

    @property
    def header_buffer_bytes(self) -> int:
        """nginx's large header buffer: a request line or a header must fit in one, a
        head in four. What nginx passes on (plus the few headers it adds, under 1 KiB)
        stays within the router's max_header_bytes."""
        return max(1024, (self.max_header_bytes - 1024) // 4)


def render(
    domain: str,
    cert: Path,
    key: Path,
    router: str,
    listen: str = "443",
    http_listen: str = "80",
    redirect_http: bool = True,
    read_timeout_s: float = 3600,
    edge: EdgeSettings | None = None,
) -> str:
    """The configuration; ValueError naming what is wrong (a certificate that does not
    exist or does not cover `*.<domain>`, a key that does not exist)."""
    if not is_domain(domain):
        raise ValueError(f"--domain {domain!r} is not a domain; write e.g. gpus.example.com")
    given = {
        "--cert": str(cert),
        "--key": str(key),
        "--router": router,
        "--listen": listen,
        "--http-listen": http_listen,
    }
    for what, value in given.items():
        if _UNSAFE.search(value):
            raise ValueError(f"{what} {value!r}: spaces, quotes, ; {{ }} and # cannot go in nginx")
    if not cert.is_file():
        raise ValueError(f"--cert {cert} does not exist")
    if not key.is_file():
        raise ValueError(f"--key {key} does not exist")
    names = certificate_names(cert)
    if f"*.{domain}" not in names:
        raise ValueError(
            f"--cert {cert} is for {', '.join(sorted(names)) or 'no name'}, not *.{domain}"
        )
    return _TEMPLATES.get_template("nginx.conf.j2").render(
        domain=domain,
        cert=cert.absolute(),
        key=key.absolute(),
        router=router,
        listen=listen,
        http_listen=http_listen,
        redirect_http=redirect_http,
        read_timeout_s=int(read_timeout_s),
        edge=edge or EdgeSettings(),
        seconds=_seconds,
    )


def _seconds(value: float) -> str:
    """A duration as nginx reads it: whole milliseconds."""
    return f"{max(1, round(value * 1000))}ms"
