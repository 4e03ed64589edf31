"""The dashboard in a real browser: Playwright driving Debian's chromium (never a browser
Playwright downloads), headless, against a real daemon on 127.0.0.1 with simulated GPUs
and real tasks. Every request the pages make must go to 127.0.0.1; a script a tenant
smuggles into a name, a command or a log must never run.

GPUPROVIDER_SCREENSHOTS=1 also writes every page at 1280x800 and 390x844 to
docs/screenshots/ (the README shows them)."""

import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from gpuprovider.testing import (
    SLACK,
    HubProcess,
    Provider,
    free_port,
    kill_task_processes,
    make_home,
    market_home,
    wait_for,
)

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e .[test])"
)
CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="Debian's chromium is not installed (make debs installs it)"
    ),
]
expect = playwright_api.expect
PY = "/usr/bin/python3"
WAIT_MS = 10_000 * SLACK
SCREENSHOTS = Path(__file__).parent.parent / "docs" / "screenshots"


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with playwright_api.sync_playwright() as p:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []  # root has no user namespace
        launched = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield launched
        launched.close()


class Tab:
    """A page in a context of its own (its own cookies), watched: requests leaving
    127.0.0.1, dialogs, script errors and CSP refusals are recorded and fail the test."""

    def __init__(self, browser, base_url: str, width: int = 1280, height: int = 800):
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.outside: list[str] = []
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._guard)
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.page.on("dialog", self._dialog)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on(
            "console",
            lambda m: (
                self.errors.append(m.text) if m.type == "error" and "401" not in m.text else None
            ),
        )
        self.base_url = base_url

    def _guard(self, route) -> None:
        if urlparse(route.request.url).hostname != "127.0.0.1":
            self.outside.append(route.request.url)
            route.abort()
        else:
            route.continue_()

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def sign_in(self, token: str) -> "Tab":
        self.page.goto(self.base_url + "/ui/")
        self.page.fill("#token", token)
        self.page.click("form.signin button[type=submit]")
        self.page.wait_for_url("**/ui/")
        return self

    def goto(self, path: str):
        return self.page.goto(self.base_url + path)

    def check_clean(self) -> None:
        assert self.outside == [], f"requests left 127.0.0.1: {self.outside}"
        assert self.dialogs == [], f"a smuggled script ran: {self.dialogs}"
        assert [e for e in self.errors if "Refused" in e or "Error" in e] == [], self.errors

    def close(self) -> None:
        self.context.close()
        self.check_clean()


@pytest.fixture
def tab(browser, provider) -> Iterator[Tab]:
    opened = Tab(browser, provider.url)
    yield opened
    opened.close()


def token_of(provider, name: str, scopes=("read", "submit"), **extra) -> str:
    made = provider.api.post("/tokens", json={"name": name, "scopes": list(scopes), **extra})
    assert made.status_code == 201, made.text
    return made.json()["token"]


def only_node(provider) -> dict:
    return provider.api.get("/nodes").json()[0]


def test_cordon_then_a_task_runs_live_from_queued_to_succeeded(browser, provider, tmp_path):
    """The admin cordons the node from its page and the scheduler skips it; the tenant's
    page shows its task queued, then (after the uncordon) running, its log line by line,
    and succeeded, all without reloading."""
    admin = Tab(browser, provider.url).sign_in(provider.token)
    tenant = Tab(browser, provider.url).sign_in(token_of(provider, "br-live"))
    node = only_node(provider)
    try:
        _cordon_and_run(admin, tenant, provider, node, tmp_path)
    finally:
        provider.api.post(f"/nodes/{node['id']}/resume")
    admin.close()
    tenant.close()


def _cordon_and_run(admin: Tab, tenant: Tab, provider, node: dict, tmp_path: Path) -> None:
    admin.goto(f"/ui/nodes/{node['id']}")
    admin.page.fill("input[name=reason]", "maintenance <b>now</b>")
    admin.page.click("#cordon")
    expect(admin.page.locator("#node-status")).to_contain_text("cordoned")
    expect(admin.page.locator("#live")).to_contain_text("maintenance <b>now</b>")
    assert provider.api.get(f"/nodes/{node['id']}").json()["status"] == "cordoned"

    go = tmp_path / "go"
    script = (
        "import os, time\n"
        "print('first line', flush=True)\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.05)\n"
        "print('second <b>line</b>', flush=True)\n"
    )
    client = provider.tenant("br-live-api", tenant="br-live")
    task = client.post("/tasks", json={"name": "live", "command": [PY, "-c", script]}).json()
    tenant.goto(f"/ui/tasks/{task['id']}")
    tenant.page.evaluate("window.stayed = true")
    expect(tenant.page.locator("#task-state")).to_contain_text("queued")
    queued = provider.task(task["id"])
    assert queued["state"] == "queued" and queued["reason"], "the scheduler skips the node"

    admin.page.click("#uncordon")
    expect(admin.page.locator("#node-status")).to_contain_text("ready")
    expect(tenant.page.locator("#task-state")).to_contain_text("running")
    expect(tenant.page.locator("#timeline")).to_contain_text("queued")
    expect(tenant.page.locator("#log")).to_contain_text("first line")
    go.write_text("")
    expect(tenant.page.locator("#log")).to_contain_text("second <b>line</b>", timeout=2000 * SLACK)
    expect(tenant.page.locator("#task-state")).to_contain_text("succeeded")
    assert tenant.page.evaluate("window.stayed") is True, "the page was never reloaded"
    tenant.page.fill("#log-search", "second")
    expect(tenant.page.locator("#log-matches")).to_have_text("second <b>line</b>")


def test_cancel_a_running_task_from_its_page(tab, provider):
    tab.sign_in(token_of(provider, "br-cancel"))
    client = provider.tenant("br-cancel-api", tenant="br-cancel")
    task = client.post("/tasks", json={"command": [PY, "-c", "import time; time.sleep(60)"]})
    task = task.json()
    provider.wait_state(task["id"], "running")
    tab.goto(f"/ui/tasks/{task['id']}")
    tab.page.click("#cancel")
    expect(tab.page.locator("#task-state")).to_contain_text("cancelled")
    assert provider.task(task["id"])["state"] == "cancelled"


def test_a_tenant_is_refused_another_tenants_task(tab, provider):
    alice = provider.tenant("br-alice")
    secret = alice.post("/tasks", json={"command": [PY, "-c", "print('alice-only')"]}).json()
    provider.wait_state(secret["id"], "succeeded")
    tab.sign_in(token_of(provider, "br-bob"))
    answer = tab.goto(f"/ui/tasks/{secret['id']}")
    assert answer.status == 404
    expect(tab.page.locator("h1")).to_contain_text("404")
    assert "alice-only" not in tab.page.content()
    answer = tab.goto(f"/ui/tasks/{secret['id']}/log.txt")
    assert answer.status == 404


SCRIPT = "<script>alert('owned')</script>"
IMG = "<img src=x onerror=alert('img')>"


def test_script_in_every_free_text_field_never_runs(tab, provider):
    command = [PY, "-c", f"print({SCRIPT!r}); print({IMG!r})", SCRIPT]
    task = provider.submit(command=command, env={"NOTE": IMG}, labels={"note": SCRIPT})
    provider.wait_state(task["id"], "succeeded")
    tab.sign_in(provider.token)
    for path in ("/ui/", "/ui/tasks", f"/ui/tasks/{task['id']}", "/ui/nodes"):
        tab.goto(path)
        tab.page.wait_for_load_state("networkidle")
    expect(tab.page.locator("body")).not_to_contain_text("owned-marker")
    tab.goto(f"/ui/tasks/{task['id']}")
    expect(tab.page.locator("#log")).to_contain_text(SCRIPT)
    expect(tab.page.locator("#log")).to_contain_text(IMG)
    tab.page.wait_for_timeout(300)  # an onerror handler would have fired by now
    assert tab.dialogs == []


def test_revoking_the_token_ends_the_browser_session(tab, provider):
    tab.sign_in(token_of(provider, "br-revoked", scopes=("read",)))
    assert provider.api.delete("/tokens/br-revoked").status_code == 200
    tab.goto("/ui/tasks")
    tab.page.wait_for_url("**/ui/signin")
    expect(tab.page.locator("[role=alert]")).to_contain_text("revoked")


def test_tokens_are_made_and_revoked_by_an_admin(tab, provider):
    tab.sign_in(provider.token)
    tab.goto("/ui/tokens")
    tab.page.fill("input[name=name]", "br-made")
    tab.page.click("form.filters button[type=submit]")
    secret = tab.page.locator("#new-token").inner_text().strip()
    assert provider.api.get("/health", headers={"Authorization": f"Bearer {secret}"}).is_success
    row = tab.page.locator("tr", has_text="br-made")
    row.locator("button", has_text="Revoke").click()
    expect(tab.page.locator("tr", has_text="br-made")).to_contain_text("revoked")
    tab.goto("/ui/tokens")  # shown once: never again
    assert secret not in tab.page.content()


def test_sign_out(tab, provider):
    tab.sign_in(provider.token)
    tab.page.click("form.who button")
    tab.page.wait_for_url("**/ui/signin")
    tab.goto("/ui/tasks")
    tab.page.wait_for_url("**/ui/signin")


@pytest.mark.skipif(
    not os.environ.get("GPUPROVIDER_SCREENSHOTS"),
    reason="screenshots are made on request: GPUPROVIDER_SCREENSHOTS=1",
)
def test_screenshots_of_every_page(browser, provider):
    provider.submit(name="train", command=[PY, "-c", "print('epoch 1 loss 0.93')"])
    script = (
        "import time\n"
        "for step in range(1, 6):\n"
        "    print(f'step {step}: loss {1 / step:.3f}', flush=True)\n"
        "time.sleep(30)\n"
    )
    task = provider.submit(name="train2", command=[PY, "-c", script], resources={"gpu": 1})
    wait_for(lambda: provider.task(task["id"])["state"] == "running", 20, "a running task")
    node = only_node(provider)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for width, height in ((1280, 800), (390, 844)):
        tab = Tab(browser, provider.url, width, height)
        tab.goto("/ui/signin")
        tab.page.screenshot(path=SCREENSHOTS / f"signin-{width}.png")
        tab.sign_in(provider.token)
        for name, path in (
            ("overview", "/ui/"),
            ("tasks", "/ui/tasks"),
            ("task", f"/ui/tasks/{task['id']}"),
            ("nodes", "/ui/nodes"),
            ("node", f"/ui/nodes/{node['id']}"),
            ("services", "/ui/services"),
            ("accounting", "/ui/accounting"),
            ("market", "/ui/market"),
            ("tokens", "/ui/tokens"),
        ):
            tab.goto(path)
            tab.page.wait_for_timeout(300)
            tab.page.screenshot(path=SCREENSHOTS / f"{name}-{width}.png", full_page=True)
        tab.close()
    provider.api.post(f"/tasks/{task['id']}/cancel")


# -- a lease from a real hub ---------------------------------------------------------------

PRICES = {"h100": 1.83, "rtx-4090": 0.52}
JOB = {  # an order file as a tenant writes it: its price in currency units per hour
    "resources": {"gpus": 1, "gpu_model": "h100", "cpus": 0, "memory_gb": 0},
    "max_price_per_hour": 2.0,
    "duration_s": 600,
    "payload": {"command": ["sleep", "1.5"]},
}


@pytest.fixture(scope="module")
def hub_and_provider(tmp_path_factory) -> Iterator:
    """A hub (simulated GPUs allowed), a provider it admits, a funded tenant."""
    root = tmp_path_factory.mktemp("ui-market")
    hub = HubProcess(
        root / "hub", free_port(), "--auction-window-s", "0.5", "--heartbeat-s", "1",
        "--allow-simulated",
    )  # fmt: skip
    port = free_port()
    home = make_home(root / "provider", port)
    market_home(home, hub.url, hub.key, PRICES)
    provider = Provider(home, port)
    try:
        provider.start()
        tenant_home = str(root / "tenant")
        done = provider.cli("--home", tenant_home, "hub", "register", hub.url, "alice")
        assert done.returncode == 0, done.stderr
        done = provider.cli("hub", "deposit", hub.url, "alice", "100", "--dir", str(hub.folder))
        assert done.returncode == 0, done.stderr
        yield hub, provider, tenant_home
    finally:
        provider.cancel_all()
        provider.stop(signal.SIGKILL)
        kill_task_processes(provider.home)
        hub.stop()


def test_a_lease_from_a_real_hub_appears_with_its_earnings(browser, hub_and_provider, tmp_path):
    hub, provider, tenant_home = hub_and_provider
    wait_for(
        lambda: provider.api.get("/market").json()[0]["status"] == "admitted",
        60,
        "the hub to admit the provider",
    )
    admin = Tab(browser, provider.url).sign_in(provider.token)
    admin.goto("/ui/market")
    expect(admin.page.locator("#live")).to_contain_text("admitted")
    admin.page.evaluate("window.stayed = true")
    order = tmp_path / "order.json"
    order.write_text(json.dumps(JOB))
    done = provider.cli(
        "--home", tenant_home, "hub", "order", hub.url, str(order), "--deposit", "5", "--json"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lease_id = json.loads(done.stdout)["id"]
    row = admin.page.locator(f"tr[data-lease='{lease_id}']")
    expect(row).to_be_visible(timeout=60_000 * SLACK)  # arrives live, no reload
    expect(row).to_contain_text("closed", timeout=60_000 * SLACK)
    assert admin.page.evaluate("window.stayed") is True
    ours = next(x for x in provider.api.get("/market/leases").json() if x["id"] == lease_id)
    assert ours["earned"] > 0
    expect(row).to_contain_text(f"{ours['earned'] / 1_000_000:.6f} units")
    expect(admin.page.locator("#live")).to_contain_text("paid, as the hub says")
    admin.goto("/ui/")  # the overview counts it in its windows
    expect(admin.page.locator("#live")).to_contain_text("h100")
    admin.close()
