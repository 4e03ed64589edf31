"""The dashboard over HTTP, as a hostile client would use it: sessions, CSRF, tenants,
escaping, the vendored assets. (tests/test_ui_browser.py drives it in a real browser.)"""

import hashlib
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gpuprovider.api.loopwatch import MARK as LOOP_MARK
from gpuprovider.api.ui import pages
from gpuprovider.domain.records import TokenRecord
from gpuprovider.domain.usability import Usability
from gpuprovider.market.model import LeaseRecord, LeaseState
from gpuprovider.service.dashboard import PAGE, Dashboard, TaskCursor, earned_between
from gpuprovider.service.errors import Rejected
from gpuprovider.store.store import Store
from gpuprovider.testing import MarketWorld, StoreWorld, free_port, wait_for

UI = Path(pages.__file__).parent
PY = "/usr/bin/python3"

# Every vendored asset, pinned: a changed byte fails here (update the README beside it).
PINNED = {
    "htmx-2.0.11.min.js": "d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717",
    "htmx-LICENSE.txt": "d3d2456f76414f2456104660ebd65aff1c04cd7966b942bdabd63f3cdb316a38",
    "uPlot-1.6.32.iife.min.js": "19c8d4c6ad88929a79f4ae49d6f7161566dfd0ba3d15cc495e974f787eb78f1f",
    "uPlot-1.6.32.min.css": "df630c6a8d6f8eeaff264b50f73ce5b114f646ffd9a0bb74f049b0a00135fa04",
    "uPlot-LICENSE.txt": "8f989229699b4fe2f1a0432d0e9edc338a8a911e250e2d1b01ecd770a5f5b1bd",
}


def test_vendored_assets_are_pinned_and_licensed() -> None:
    vendor = UI / "static" / "vendor"
    found = {p.name for p in vendor.iterdir()} - {"README.md"}
    assert found == set(PINNED), "every vendored file is pinned here, and only those"
    for name, digest in PINNED.items():
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name


def test_pages_load_nothing_from_outside() -> None:
    for path in [*(UI / "templates").iterdir(), *(UI / "static").glob("*.*")]:
        text = path.read_text()
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", text), path.name
        assert "<script>" not in text, f"{path.name}: inline scripts are refused by the CSP"
    for name in ("htmx-2.0.11.min.js", "uPlot-1.6.32.iife.min.js"):
        text = (UI / "static" / "vendor" / name).read_text()
        assert "sourceMappingURL" not in text


# -- sessions ---------------------------------------------------------------------------


def sign_in(url: str, token: str, prefix: str = "") -> httpx.Client:
    client = httpx.Client(base_url=url, follow_redirects=False, timeout=30)
    headers = {"X-Forwarded-Prefix": prefix} if prefix else {}
    form = client.get("/ui/signin", headers=headers)
    assert form.status_code == 200
    pre = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    if prefix:  # the cookie's path is the prefix's: what a browser there would send
        headers["Cookie"] = f"gpp_signin={form.cookies['gpp_signin']}"
    done = client.post("/ui/signin", data={"csrf": pre, "token": token}, headers=headers)
    assert done.status_code == 303, done.text
    assert done.headers["location"] == f"{prefix}/ui/"
    return client


def csrf_of(client: httpx.Client, path: str = "/ui/") -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    return re.search(r'"X-CSRF-Token": "([^"]+)"', page.text).group(1)


def test_signin_cookie_is_httponly_strict_and_holds_no_token(provider) -> None:
    client = sign_in(provider.url, provider.token)
    cookie = next(c for c in client.cookies.jar if c.name == "gpp_session")
    assert provider.token not in cookie.value
    page = client.get("/ui/")
    assert page.status_code == 200
    assert "Content-Security-Policy" in page.headers
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    raw = httpx.Client(base_url=provider.url)
    form = raw.get("/ui/signin")
    pre = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    made = raw.post(
        "/ui/signin", data={"csrf": pre, "token": provider.token}, follow_redirects=False
    )
    set_cookie = made.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=strict" in set_cookie
    assert "secure" not in set_cookie.split("gpp_signin")[0]  # plain HTTP here
    over_tls = raw.get("/ui/signin", headers={"X-Forwarded-Proto": "https"})
    assert "secure" in over_tls.headers["set-cookie"].lower()


def test_signin_refuses_a_wrong_token_and_a_forged_form(provider) -> None:
    client = httpx.Client(base_url=provider.url, follow_redirects=False)
    form = client.get("/ui/signin")
    pre = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    wrong = client.post("/ui/signin", data={"csrf": pre, "token": "gpp_nope"})
    assert wrong.status_code == 401 and "unknown token" in wrong.text
    forged = client.post("/ui/signin", data={"csrf": "x" * 43, "token": provider.token})
    assert forged.status_code == 403 and "CSRF" in forged.text
    assert "gpp_session" not in forged.headers.get("set-cookie", "")


def test_pages_need_a_session(provider) -> None:
    client = httpx.Client(base_url=provider.url, follow_redirects=False)
    for path in ("/ui/", "/ui/tasks", "/ui/nodes", "/ui/tokens", "/ui/events"):
        answer = client.get(path)
        assert answer.status_code == 303 and answer.headers["location"] == "/ui/signin"
    client.cookies.set("gpp_session", "made-up")
    forged = client.get("/ui/")
    assert forged.status_code == 303


def test_actions_without_the_csrf_token_are_refused_and_change_nothing(provider) -> None:
    client = sign_in(provider.url, provider.token)
    task = provider.submit(command=[PY, "-c", "import time; time.sleep(30)"])
    for sent in ({}, {"csrf": "forged"}, {"csrf": ""}):
        refused = client.post(f"/ui/tasks/{task['id']}/cancel", data=sent)
        assert refused.status_code == 403, refused.text
        assert "CSRF" in refused.text and "<html" in refused.text  # a page, not JSON
    node = provider.api.get("/nodes").json()[0]
    refused = client.post(f"/ui/nodes/{node['id']}/cordon", data={"reason": "x"})
    assert refused.status_code == 403
    assert provider.task(task["id"])["state"] not in ("cancelling", "cancelled")
    assert provider.api.get(f"/nodes/{node['id']}").json()["status"] == "ready"
    # the same action with the session's token goes through
    csrf = csrf_of(client, f"/ui/tasks/{task['id']}")
    done = client.post(f"/ui/tasks/{task['id']}/cancel", data={"csrf": csrf})
    assert done.status_code == 303
    provider.wait_state(task["id"], "cancelled")


def test_a_revoked_token_ends_its_session(provider) -> None:
    made = provider.api.post("/tokens", json={"name": "ui-revoked", "scopes": ["read"]}).json()
    client = sign_in(provider.url, made["token"])
    assert client.get("/ui/").status_code == 200
    assert provider.api.delete("/tokens/ui-revoked").status_code == 200
    ended = client.get("/ui/")
    assert ended.status_code == 303 and ended.headers["location"] == "/ui/signin"
    said = client.get("/ui/signin")  # why, from the daemon's record of the session
    assert "token &#39;ui-revoked&#39; was revoked" in said.text
    assert client.get("/ui/").status_code == 303  # gone for good
    # the reason is never taken from the address: a link cannot write on the page
    lure = client.get("/ui/signin", params={"why": "enter your token at evil.example"})
    assert "evil.example" not in lure.text


def test_an_expired_token_ends_its_session(provider) -> None:
    made = provider.api.post(
        "/tokens", json={"name": "ui-brief", "scopes": ["read"], "expires_in_s": 1.5}
    ).json()
    client = sign_in(provider.url, made["token"])
    wait_for(lambda: client.get("/ui/").status_code == 303, 10, "the session to end")


def test_a_tenant_sees_only_its_own_tasks(provider) -> None:
    alice = provider.tenant("ui-alice")
    bob_token = provider.api.post(
        "/tokens", json={"name": "ui-bob", "scopes": ["read", "submit"]}
    ).json()["token"]
    secret = alice.post("/tasks", json={"command": [PY, "-c", "print('alice-secret')"]}).json()
    provider.wait_state(secret["id"], "succeeded")
    bob = sign_in(provider.url, bob_token)
    for path in ("", "/log.txt", "/log/stream"):
        refused = bob.get(f"/ui/tasks/{secret['id']}{path}")
        assert refused.status_code == 404, (path, refused.status_code)
        assert "alice-secret" not in refused.text
    refused = bob.post(f"/ui/tasks/{secret['id']}/cancel", data={"csrf": csrf_of(bob)})
    assert refused.status_code == 404
    assert secret["id"] not in bob.get("/ui/tasks").text
    assert secret["id"] not in bob.get("/ui/tasks", params={"tenant": "ui-alice"}).text
    # what an admin-only page or action answers a tenant: 403, nothing changed
    assert bob.get("/ui/tokens").status_code == 403
    assert bob.get("/ui/market").status_code == 403
    node = provider.api.get("/nodes").json()[0]
    cordon = bob.post(f"/ui/nodes/{node['id']}/cordon", data={"csrf": csrf_of(bob)})
    assert cordon.status_code == 403
    assert provider.api.get(f"/nodes/{node['id']}").json()["status"] == "ready"
    admin = sign_in(provider.url, provider.token)
    assert "alice-secret" in admin.get(f"/ui/tasks/{secret['id']}").text


def test_a_read_only_token_cannot_act(provider) -> None:
    reader_token = provider.api.post("/tokens", json={"name": "ui-ro", "scopes": ["read"]}).json()[
        "token"
    ]
    submitter = provider.tenant("ui-ro-submit", tenant="ui-ro")  # the same tenant
    task = submitter.post(
        "/tasks", json={"command": [PY, "-c", "import time; time.sleep(30)"]}
    ).json()
    reader = sign_in(provider.url, reader_token)
    page = reader.get(f"/ui/tasks/{task['id']}")
    assert page.status_code == 200 and 'id="cancel"' not in page.text  # no button
    refused = reader.post(f"/ui/tasks/{task['id']}/cancel", data={"csrf": csrf_of(reader)})
    assert refused.status_code == 403 and "submit" in refused.text
    assert provider.task(task["id"])["state"] not in ("cancelling", "cancelled")
    provider.api.post(f"/tasks/{task['id']}/cancel")


SCRIPT = "<script>document.title='owned'</script>"


def test_html_in_commands_and_logs_is_escaped(provider) -> None:
    task = provider.submit(
        command=[PY, "-c", f"print({SCRIPT!r}); print('<img src=x onerror=alert(1)>')"],
        env={"NOTE": SCRIPT},
    )
    provider.wait_state(task["id"], "succeeded")
    client = sign_in(provider.url, provider.token)
    page = client.get(f"/ui/tasks/{task['id']}").text
    assert "<script>document" not in page and "<img src=x" not in page
    assert "&lt;script&gt;document.title=&#39;owned&#39;&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    log = client.get(f"/ui/tasks/{task['id']}/log.txt")
    assert log.headers["content-type"] == "application/octet-stream"  # never rendered
    assert "attachment" in log.headers["content-disposition"]


def test_task_log_is_read_by_range(provider) -> None:
    task = provider.submit(command=[PY, "-c", "print('x' * 200_000)"])
    provider.wait_state(task["id"], "succeeded")
    client = sign_in(provider.url, provider.token)
    page = client.get(f"/ui/tasks/{task['id']}").text
    assert "showing from byte" in page and len(page) < 100_000  # the tail only
    piece = client.get(f"/ui/tasks/{task['id']}/log.txt", params={"offset": 10, "limit": 100})
    assert piece.content == b"x" * 100 and piece.headers["X-Log-Next"] == "110"


def test_under_a_path_prefix(provider) -> None:
    client = sign_in(provider.url, provider.token, prefix="/provider")
    cookie = next(c for c in client.cookies.jar if c.name == "gpp_session")
    assert client.get("/ui/").status_code == 303  # not sent outside its path
    assert cookie.path == "/provider/ui"
    # a client that sends the cookie (as a browser would under the prefix)
    page = client.get(
        "/ui/",
        headers={"X-Forwarded-Prefix": "/provider", "Cookie": f"gpp_session={cookie.value}"},
    )
    assert page.status_code == 200
    assert 'href="/provider/ui/tasks"' in page.text
    assert 'src="/provider/ui/static/vendor/htmx-2.0.11.min.js"' in page.text
    odd = client.get(
        "/ui/",
        headers={"X-Forwarded-Prefix": '/"><x', "Cookie": f"gpp_session={cookie.value}"},
    )
    assert '"><x' not in odd.text  # a prefix that is not a plain path is ignored


def test_overview_counts_gpus_and_tasks(provider) -> None:
    client = sign_in(provider.url, provider.token)
    page = client.get("/ui/").text
    gpus = len([g for g in provider.api.get("/gpus").json() if g["present"]])
    assert f'<dd id="gpus-total">{gpus}</dd>' in page


# -- the task list's cursor -----------------------------------------------------------------


def test_task_pages_follow_the_cursor_without_gaps_or_repeats(tmp_path: Path) -> None:
    world = StoreWorld(tmp_path)
    made = [world.submit().id for _ in range(PAGE * 2 + 7)]
    dashboard = Dashboard(world.store, Usability(None, set()), [])
    admin = TokenRecord("a", "admin", ["admin"], "admin", time.time())
    seen: list[str] = []
    cursor = ""
    while True:
        page = dashboard.tasks(admin, before=cursor)
        seen += [t["id"] for t in page["tasks"]]
        if not page["next"]:
            break
        cursor = page["next"]
    assert sorted(seen) == sorted(made) and len(seen) == len(set(seen))
    other = TokenRecord("b", "bob", ["read"], "bob", time.time())
    assert dashboard.tasks(other)["tasks"] == []
    with pytest.raises(Rejected):
        dashboard.tasks(admin, before="nan~x")
    with pytest.raises(Rejected):
        dashboard.tasks(admin, state="nope")
    assert TaskCursor.parse(TaskCursor(1.5, "t-1").text()) == TaskCursor(1.5, "t-1")


def test_a_token_made_on_the_page_is_checked_like_the_apis(provider) -> None:
    admin = sign_in(provider.url, provider.token)
    csrf = csrf_of(admin, "/ui/tokens")
    bad = admin.post("/ui/tokens", data={"csrf": csrf, "name": "<b>x</b>", "scope_read": "1"})
    assert bad.status_code == 422 and "name" in bad.text and "<b>x" not in bad.text
    none = admin.post("/ui/tokens", data={"csrf": csrf, "name": "ui-noscope"})
    assert none.status_code == 422 and "scopes" in none.text
    names = [t["name"] for t in provider.api.get("/tokens").json()]
    assert "ui-noscope" not in names and "<b>x</b>" not in names


# -- earnings ------------------------------------------------------------------------------


def lease_record(running_since: float | None, ended_at: float | None, duration_s: int):
    return LeaseRecord(
        "l-1", "hub", LeaseState.RUNNING, {"duration_s": duration_s}, "h100", 3_600_000, "",
        None, "", running_since, ended_at, "", "", 0, "", None, 0.0, 0, "", 0.0, 0.0,
    )  # fmt: skip


def test_earnings_count_the_running_time_inside_each_window() -> None:
    now = 1_000_000.0
    day = 86_400.0
    # 3.6 units an hour: ran 2 h, ending 1 h ago, started 3 h ago
    lease = lease_record(now - 3 * 3600, now - 3600, 10 * 3600)
    assert earned_between(lease, now - day, now) == 7_200_000
    assert earned_between(lease, now - 2 * 3600, now) == 3_600_000  # its last hour only
    assert earned_between(lease, now - 600, now) == 0
    capped = lease_record(now - 5 * 3600, None, 3600)  # ran past its duration: paid for it
    assert earned_between(capped, now - day, now) == 3_600_000
    assert earned_between(lease_record(None, None, 3600), 0, now) == 0


def test_the_overview_shows_a_leases_earnings_to_admins_only(tmp_path: Path) -> None:
    world = MarketWorld(tmp_path, Ed25519PrivateKey.generate())
    world.won()
    world.run(world.task_of())
    dashboard = Dashboard(world.store, Usability(), [world.service])
    admin = TokenRecord("a", "admin", ["admin"], "admin", time.time())
    earnings = dashboard.overview(admin)["earnings"]
    (row,) = earnings["rows"]
    assert row["market"] == "hub" and row["leases"] == 1
    assert earnings["paid_by_the_hub"] == {"hub": None}  # the hub's own count, beside ours
    tenant = TokenRecord("b", "market-hub", ["read"], "market-hub", time.time())
    assert dashboard.overview(tenant)["earnings"] is None


HOSTILE_BODIES = [
    b"",
    b"\xff\xfe\x00garbage",
    b'{"csrf": "x"}',
    b"csrf=" + b"A" * 70_000,  # over the form limit
    b"csrf=%ZZ&&&==&name=%00%01",
    b"name=" + "é".encode() * 10 + b"&csrf",
]


def test_hostile_forms_never_make_a_page_fail(provider) -> None:
    client = sign_in(provider.url, provider.token)
    csrf = csrf_of(client)
    node = provider.api.get("/nodes").json()[0]["id"]
    paths = [
        "/ui/signin",
        "/ui/signout",
        "/ui/tasks/t-nope/cancel",
        f"/ui/nodes/{node}/cordon",
        f"/ui/nodes/{node}/explode",
        "/ui/tokens",
        "/ui/tokens/nobody/revoke",
    ]
    for path in paths:
        for body in HOSTILE_BODIES:
            for header in ({}, {"X-CSRF-Token": csrf}):
                answer = client.post(
                    path,
                    content=body,
                    headers={"Content-Type": "application/x-www-form-urlencoded", **header},
                )
                assert answer.status_code < 500, (path, body[:20], answer.status_code)
    assert provider.api.get(f"/nodes/{node}").json()["status"] == "ready"
    client = sign_in(provider.url, provider.token)  # /ui/signout above ended the session
    for path in ("/ui/tasks?before=x~", "/ui/tasks?state=%00", "/ui/tasks?before=1e999~t"):
        assert client.get(path).status_code in (400, 422), path


NGINX_SITE = """
server {{
    listen 127.0.0.1:{listen};
    location /provider/ {{
        proxy_pass http://127.0.0.1:{port}/;
        proxy_http_version 1.1;
        proxy_set_header X-Forwarded-Prefix /provider;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_buffering off;
        proxy_read_timeout 1h;
    }}
}}
"""


def test_behind_nginx_under_a_path_prefix(provider, tmp_path: Path) -> None:
    """The README's nginx location: the dashboard at /provider/ui/, cookies scoped to
    it, links and assets under it, its event stream passed through as it comes."""
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx_bin).exists():
        pytest.skip("nginx missing: `make test` installs Debian's nginx")
    listen = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log; daemon off;\n"
        f"events {{}}\nhttp {{ access_log off; client_body_temp_path {tmp_path}/body; "
        f"proxy_temp_path {tmp_path}/proxy;\n"
        + NGINX_SITE.format(listen=listen, port=provider.port)
        + "}\n"
    )
    server = subprocess.Popen([nginx_bin, "-c", str(conf), "-p", str(tmp_path)])
    try:
        base = f"http://127.0.0.1:{listen}/provider"

        def answers() -> bool:
            try:
                return httpx.get(base + "/ui/signin", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(answers, 20, "nginx to answer")
        client = httpx.Client(base_url=base, timeout=30, follow_redirects=True)
        form = client.get("/ui/")  # redirected to the sign-in page under the prefix
        assert str(form.url) == base + "/ui/signin"
        pre = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        page = client.post("/ui/signin", data={"csrf": pre, "token": provider.token})
        assert str(page.url) == base + "/ui/" and 'href="/provider/ui/tasks"' in page.text
        assert all(c.path == "/provider/ui" for c in client.cookies.jar)
        asset = client.get("/ui/static/vendor/htmx-2.0.11.min.js")
        assert hashlib.sha256(asset.content).hexdigest() == PINNED["htmx-2.0.11.min.js"]
        with client.stream("GET", "/ui/events") as stream:
            first = next(stream.iter_lines())
        assert first == ": following"
    finally:
        server.terminate()
        server.wait(10)


def test_accounting_shows_a_tenant_its_own_gpu_hours_and_exports_them(provider) -> None:
    store = Store(provider.home.store_url(""))
    with store.tx() as tx:
        tx.repairs.add_usage(
            time.time(),
            {("ui-acct", "h100-80gb-sxm"): (7200.0, 1800.0), ("=evil", "h100-80gb-sxm"): (3600, 0)},
        )
    store.close()
    token = provider.api.post("/tokens", json={"name": "ui-acct", "scopes": ["read"]}).json()
    tenant = sign_in(provider.url, token["token"])
    page = tenant.get("/ui/accounting", params={"days": 14}).text
    assert "2.00 GPU-h" in page and "0.50 GPU-h" in page and "25 %" in page
    assert "evil" not in page
    exported = tenant.get("/ui/accounting.csv", params={"days": 31})
    assert exported.headers["content-type"].startswith("text/csv")
    assert exported.text.splitlines()[1] == "ui-acct,h100-80gb-sxm,2.0000,0.5000,0.2500"
    admin = sign_in(provider.url, provider.token).get("/ui/accounting.csv").text
    assert "'=evil,h100-80gb-sxm,1.0000" in admin  # never a formula in a spreadsheet
    assert tenant.get("/ui/accounting", params={"days": 0}).status_code == 422


def test_a_service_page_shows_its_replicas_to_its_tenant_only(provider) -> None:
    owner = provider.tenant("ui-svc")
    made = owner.post(
        "/tasks",
        json={
            "name": "web",
            "kind": "service",
            "command": [PY, "-c", "import time; time.sleep(60)"],
            "ports": ["http"],
            "serve": {"name": "ui-web"},
        },
    )
    assert made.status_code == 201, made.text
    service = owner.get("/services/ui-web").json()
    token = provider.api.post(
        "/tokens", json={"name": "ui-svc-web", "scopes": ["read"], "tenant": "ui-svc"}
    ).json()["token"]
    mine = sign_in(provider.url, token)
    assert f'href="/ui/services/{service["id"]}"' in mine.get("/ui/services").text
    page = mine.get(f"/ui/services/{service['id']}")
    assert page.status_code == 200 and "Service ui-web" in page.text
    assert made.json()["id"] in page.text  # its replica, linked to its log
    other = sign_in(
        provider.url,
        provider.api.post("/tokens", json={"name": "ui-svc-other", "scopes": ["read"]}).json()[
            "token"
        ],
    )
    assert other.get(f"/ui/services/{service['id']}").status_code == 404
    assert "ui-web" not in other.get("/ui/services").text
    owner.delete("/services/ui-web")


def test_a_node_page_shows_its_gpus_checks_and_events(provider) -> None:
    node = provider.api.get("/nodes").json()[0]
    client = sign_in(provider.url, provider.token)
    page = client.get(f"/ui/nodes/{node['id']}").text
    stored = provider.api.get(f"/nodes/{node['id']}/checks").json()["results"]
    assert stored, "the daemon stores its preflight checks at start"
    assert f"{stored[0]['group']}/{stored[0]['name']}" in page
    assert page.count("(simulated)") == node["gpu_count"]
    assert "registered" in page  # its first event
    assert client.get("/ui/nodes/no-such-node").status_code == 404


def test_open_event_streams_never_hold_up_a_stop(fresh_provider) -> None:
    """An open dashboard (or a client of /events/stream) never keeps the daemon running
    once it is told to stop."""
    fresh_provider.start()
    client = sign_in(fresh_provider.url, fresh_provider.token)
    api = fresh_provider.api
    with (
        client.stream("GET", "/ui/events") as page,
        api.stream("GET", "/events/stream", params={"after": "now"}) as feed,
    ):
        assert next(page.iter_lines()) == ": following"
        assert next(feed.iter_lines()) == ": following"
        assert fresh_provider.stop() == 0  # SIGTERM; fails if it is still up after 20 s


def test_nothing_blocked_the_event_loop(provider) -> None:
    """The pages this module opened rendered and read off the loop that serves the API
    (the module's daemon watches it at 50 ms). Last in the module."""
    blocked = [line for line in provider.log().splitlines() if LOOP_MARK in line]
    assert blocked == []
