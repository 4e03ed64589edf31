"""Every JSON door of the daemon (its API, Swan's routes) and of the hub, sent what a
hostile or broken peer sends: JSON nested thousands deep, bodies far over the limit,
numbers of hundreds of digits or past any float, strings and booleans where numbers
go. Each is refused with a 4xx saying why, before anything else reads it (signed or
not), and neither server answers 5xx or stops."""

from __future__ import annotations

import json

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gpuprovider.identity.signing import sign_request
from gpuprovider.testing import HubProcess, free_port

DEEP = b"[" * 5000 + b"]" * 5000
BODIES = {
    "deep": DEEP,
    "deep-in-an-object": b'{"command": ["true"], "env": ' + b"{" * 3000 + b"}" * 3000 + b"}",
    "huge": b'{"x": "' + b"x" * ((1 << 20) + 4096) + b'"}',  # past both servers' 1 MiB
    "digits": b'{"amount": ' + b"9" * 400 + b', "deposit": 1' + b"0" * 400 + b"}",
    "past-float": b'{"amount": 1e400, "replicas": 1e400, "price_per_hour": -1e999}',
    "not-numbers": b'{"amount": "5", "deposit": true, "replicas": "3", "price_per_hour": "1"}',
    "not-json": b"{not json",
    "not-utf8": b'{"x": "\xff\xfe"}',
    "nan": b'{"amount": NaN, "deposit": Infinity}',
}


def _routes(openapi: dict) -> list[tuple[str, str]]:
    """Every (method, path) of the schema, its path parameters filled in."""
    found = []
    for path, methods in openapi["paths"].items():
        concrete = path
        for part in ("{ref}", "{uuid}", "{name}", "{job_uuid}", "{subject}", "{stage}"):
            concrete = concrete.replace(part, "x")
        for method in methods:
            if method in ("post", "put", "patch", "delete"):
                found.append((method.upper(), concrete))
    return found


def test_no_body_makes_the_daemon_fail(provider):
    openapi = httpx.get(provider.url + "/api/v1/openapi.json").json()
    routes = _routes(openapi)
    assert ("POST", "/api/v1/tasks") in routes and len(routes) > 15
    answers: dict[tuple[str, str, str], int] = {}
    for method, path in routes:
        for name, body in BODIES.items():
            response = provider.api.request(
                method,
                provider.url + path,
                content=body,
                headers={"Content-Type": "application/json"},
            )
            answers[(method, path, name)] = response.status_code
    failed = {k: v for k, v in answers.items() if v >= 500}
    assert failed == {}
    # JSON too deep is refused before any route reads it, whoever it is for
    assert all(v == 400 for (m, p, n), v in answers.items() if n == "deep")
    assert answers[("POST", "/api/v1/tasks", "huge")] == 413
    assert provider.api.get("/health").status_code == 200
    assert "Traceback" not in provider.log()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    made = HubProcess(tmp_path_factory.mktemp("hub"), free_port())
    yield made
    made.stop()


HUB_ROUTES = [
    ("POST", "/v1/providers"),
    ("POST", "/v1/providers/heartbeat"),
    ("POST", "/v1/tenants"),
    ("POST", "/v1/orders"),
    ("POST", "/v1/orders/ord-x/bids"),
    ("POST", "/v1/orders/ord-x/dispatch"),
    ("POST", "/v1/leases/ord-x/state"),
    ("POST", "/v1/leases/ord-x/close"),
    ("POST", "/v1/leases/ord-x/usage"),
    ("POST", "/v1/admin/deposit"),
]


@pytest.mark.slow
def test_no_body_makes_the_hub_fail_signed_or_not(hub):
    tenant = Ed25519PrivateKey.generate()
    registered = _signed(hub, tenant, "POST", "/v1/tenants", json.dumps({"name": "t"}).encode())
    assert registered.status_code == 200, registered.text
    answers = {}
    for method, path in HUB_ROUTES:
        for name, body in BODIES.items():
            plain = httpx.request(method, hub.url + path, content=body, timeout=30)
            signed = _signed(hub, tenant, method, path, body)
            admin = httpx.request(
                method,
                hub.url + path,
                content=body,
                headers=dict(hub.admin.headers),
                timeout=30,
            )
            answers[(path, name)] = (plain.status_code, signed.status_code, admin.status_code)
    assert {k: v for k, v in answers.items() if max(v) >= 500} == {}
    # parse limits come first: a deep or huge body is refused as such, unsigned too
    for (path, name), (plain, signed, admin) in answers.items():
        if name in ("deep", "deep-in-an-object", "not-json", "digits", "past-float", "nan"):
            assert plain == signed == admin == 400, (path, name)
        if name == "huge":
            assert plain == signed == admin == 413, (path, name)
    # strings and booleans are not money: refused, never coerced
    deposit = hub.admin.post("/v1/admin/deposit", json={"tenant": "t", "amount": "5"})
    assert deposit.status_code == 422 and "amount" in deposit.json()["error"]
    assert httpx.get(hub.url + "/v1/info").status_code == 200


def _signed(hub, key, method: str, path: str, body: bytes) -> httpx.Response:
    headers = sign_request(key, method, path, body)
    return httpx.request(method, hub.url + path, content=body, headers=headers, timeout=30)
