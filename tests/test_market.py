"""Work from markets: the model, pricing, signed requests and usage, and the whole loop
through a real hub and real providers on 127.0.0.1 (with a tenant that misbehaves)."""

import json
import signal
import sqlite3
import stat
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import update

from gpuprovider.domain import catalogue
from gpuprovider.hub import store as hub_tables
from gpuprovider.hub.hub import Hub, HubError, HubSettings
from gpuprovider.hub.store import HubStore
from gpuprovider.identity.keys import public_key_hex
from gpuprovider.identity.signing import BadSignature, ReplayCache, sign_request, verify_request
from gpuprovider.lifecycle.kernel import IllegalTransition
from gpuprovider.lifecycle.leases import LEASES
from gpuprovider.market.client import HubClient
from gpuprovider.market.model import (
    LeaseState,
    Order,
    OrderResources,
    Transfer,
    charge,
)
from gpuprovider.market.pricing import PriceTable, Pricing, Unpriceable, akash_input, quote_table
from gpuprovider.market.usage import Usage, UsageError, check_chain, check_next, genesis, seal
from gpuprovider.testing import (
    HubProcess,
    Provider,
    free_port,
    kill_task_processes,
    make_home,
    market_home,
    wait_for,
)

KEY = Ed25519PrivateKey.generate()


def order(**change) -> Order:
    base = {
        "id": "ord-1",
        "resources": {"gpus": 1, "gpu_model": "h100", "cpus": 2, "memory_gb": 8},
        "max_price_per_hour": 3_000_000,
        "duration_s": 600,
        "payload": {"command": ["true"]},
    }
    return Order.model_validate(base | change)


# -- the model ------------------------------------------------------------------------


def test_short_jobs_are_never_free_and_money_is_whole_micros():
    assert charge(1_830_000, 1) == 509  # 1.83/h for one second, rounded up
    assert charge(1, 0.001) == 1  # any positive time at a positive price costs something
    assert charge(1_830_000, 0) == 0 and charge(0, 100) == 0
    # Swan prices duration/3600 in integer arithmetic: any job under an hour was free
    assert charge(1_830_000, 3599) == 1_829_492


def test_leases_follow_one_table():
    assert LEASES.allowed(LeaseState.BIDDING, LeaseState.WON)
    assert LEASES.allowed(LeaseState.RUNNING, LeaseState.CLOSING)
    for current, target in [
        (LeaseState.CLOSED, LeaseState.RUNNING),
        (LeaseState.LOST, LeaseState.WON),
        (LeaseState.LOST, LeaseState.CLOSED),
        (LeaseState.OFFERED, LeaseState.RUNNING),
    ]:
        with pytest.raises(IllegalTransition, match=f"from {current} to {target}"):
            LEASES.check(SimpleNamespace(state=current, id="ord-1"), target)


def test_a_transfer_posts_two_sides_that_sum_to_zero():
    made = Transfer("t1", "tenant:a", "escrow:l", 500)
    assert sum(p.amount for p in made.postings) == 0
    for amount in (0, -5, 10**16):
        with pytest.raises(ValueError):
            Transfer("t2", "tenant:a", "escrow:l", amount)
    with pytest.raises(ValueError):
        Transfer("t3", "tenant:a", "tenant:a", 5)


def test_orders_reject_what_no_one_could_price_or_run():
    with pytest.raises(ValueError, match="unknown GPU model"):
        order(resources={"gpus": 1, "gpu_model": "H900"})
    with pytest.raises(ValueError, match="whole number"):
        order(resources={"gpus": 1.5})
    with pytest.raises(ValueError):
        order(max_price_per_hour=0)
    with pytest.raises(ValueError, match="Extra inputs"):
        Order.model_validate(order().model_dump() | {"surprise": 1})


# -- pricing --------------------------------------------------------------------------


def test_the_price_table_prices_each_model_and_refuses_unknown_ones():
    table = PriceTable(
        gpu_hour={"h100": 1.83, "h100-80gb-pcie": 1.425},
        cpu_hour=0.01,
        memory_gb_hour=0.005,
        min_duration_s=60,
    )
    sxm = quote_table(table, order(), "h100-80gb-sxm")
    pcie = quote_table(table, order(), "h100-80gb-pcie")
    assert sxm.price_per_hour == 1_830_000 + 20_000 + 40_000  # family price, cores, memory
    assert pcie.price_per_hour == 1_425_000 + 20_000 + 40_000  # an exact id wins
    short = quote_table(table, order(duration_s=5), "h100-80gb-sxm")
    assert short.billed_s == 60 and short.total == charge(sxm.price_per_hour, 60)
    quarter = quote_table(
        table, order(resources={"gpus": 0.25, "gpu_model": "h100"}), "h100-80gb-sxm"
    )
    assert quarter.price_per_hour == 457_500 + 10_000 + 20_000  # a quarter of the GPU
    # Swan read its per-model table but always charged the default: here a model with no
    # price is refused by name
    with pytest.raises(Unpriceable, match="no price for a100-80gb-sxm"):
        quote_table(table, order(resources={"gpus": 1, "gpu_model": "a100"}), "a100-80gb-sxm")


def script(tmp_path: Path, body: str) -> PriceTable:
    path = tmp_path / "price.sh"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return PriceTable(script=str(path), script_timeout_s=1.0, script_block_s=6.0)


def test_an_akash_pricing_script_prices_from_the_same_json(tmp_path):
    seen = tmp_path / "stdin.json"
    table = script(tmp_path, f"cat > {seen}\necho 3050.5\n")
    quote = Pricing(table).quote(order(), "h100-80gb-sxm")
    assert quote.price_per_hour == 1_830_300  # 3050.5 micros per 6 s block
    sent = json.loads(seen.read_text())
    assert sent == akash_input(order(), "h100-80gb-sxm", 6.0)
    gpu = sent["resources"][0]["gpu"]
    assert gpu == {
        "units": 1,
        "attributes": {"vendor": {"nvidia": {"model": "h100", "ram": "80gi"}}},
    }
    assert sent["resources"][0]["cpu"] == 2000 and sent["price_precision"] == 6


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("sleep 5\n", "no price within"),
        ("echo broken >&2; exit 3\n", "exited 3: broken"),
        ("echo lots\n", "not a positive price"),
        ("echo -- -5\n", "not a positive price"),
        ("echo 1e30\n", "too much"),
    ],
    ids=["hangs", "crashes", "garbage", "negative", "absurd"],
)
def test_a_pricing_script_that_misbehaves_prices_nothing(tmp_path, body, message):
    with pytest.raises(Unpriceable, match=message):
        Pricing(script(tmp_path, body)).quote(order(), "h100-80gb-sxm")


# -- signed requests and usage ----------------------------------------------------------


def test_signed_requests_refuse_tampering_replay_and_old_signatures():
    cache = ReplayCache()
    body = b'{"a": 1}'
    headers = sign_request(KEY, "POST", "/v1/orders", body)
    assert verify_request(headers, "POST", "/v1/orders", body, cache) == public_key_hex(KEY)
    with pytest.raises(BadSignature, match="replayed"):
        verify_request(headers, "POST", "/v1/orders", body, cache)
    fresh = sign_request(KEY, "POST", "/v1/orders", body)
    for method, target, sent in [
        ("POST", "/v1/orders", b'{"a": 2}'),
        ("POST", "/v1/orders?x=1", body),
        ("PUT", "/v1/orders", body),
    ]:
        with pytest.raises(BadSignature, match="does not verify"):
            verify_request(fresh, method, target, sent, cache)
    with pytest.raises(BadSignature, match="from now"):
        verify_request(fresh, "POST", "/v1/orders", body, cache, now=time.time() + 31)
    with pytest.raises(BadSignature, match="missing"):
        verify_request({}, "POST", "/v1/orders", body, cache)
    restarted = ReplayCache()  # a server started later has not seen the first nonce
    restarted.not_before += 1
    with pytest.raises(BadSignature, match="before this server started"):
        verify_request(headers, "POST", "/v1/orders", body, restarted)
    assert cache.refused == 2


def test_usage_and_orders_refuse_numbers_that_are_not_numbers():
    record = {
        "lease_id": "l1",
        "seq": 1,
        "start": 0.0,
        "end": 1.0,
        "prev": genesis("l1"),
        "gpu_seconds": {"h100-80gb-sxm": 1.0},
    }
    for bad in (
        {"end": float("nan")},
        {"start": float("-inf")},
        {"gpu_seconds": {"h100-80gb-sxm": float("inf")}},
    ):
        with pytest.raises(ValueError):
            Usage.model_validate(record | bad)
    with pytest.raises(ValueError):
        order(resources={"gpus": 1, "cpus": float("nan")})


def test_usage_records_chain_and_any_change_shows():
    def record(seq, prev, start):
        return seal(
            KEY,
            Usage(
                lease_id="l1",
                seq=seq,
                start=start,
                end=start + 60,
                gpu_seconds={"h100-80gb-sxm": 60.0},
                prev=prev,
            ),
        )

    first = record(1, genesis("l1"), 0)
    second = record(2, first.hash, 60)
    assert [
        u.seq for u in check_chain([first.model_dump(), second.model_dump()], public_key_hex(KEY))
    ] == [1, 2]
    key = public_key_hex(KEY)
    with pytest.raises(UsageError, match="out of sequence"):
        check_next(record(3, first.hash, 60), key, first)
    with pytest.raises(UsageError, match="does not chain"):
        check_next(record(2, genesis("l1"), 60), key, first)
    with pytest.raises(UsageError, match="overlaps"):
        check_next(record(2, first.hash, 30), key, first)
    inflated = second.model_copy(update={"gpu_seconds": {"h100-80gb-sxm": 6000.0}})
    with pytest.raises(UsageError, match="hash does not match"):
        check_next(inflated, key, first)
    resealed = seal(Ed25519PrivateKey.generate(), inflated)
    with pytest.raises(UsageError, match="not signed"):
        check_next(resealed, key, first)


# -- the whole loop on 127.0.0.1 --------------------------------------------------------

PRICES = {"h100": 1.83, "rtx-4090": 0.52}
JOB = {  # an order file as a tenant writes it: its price in currency units per hour
    "resources": {"gpus": 1, "gpu_model": "h100", "cpus": 0, "memory_gb": 0},
    "max_price_per_hour": 2.0,
    "duration_s": 600,
    "payload": {"command": ["sleep", "1.5"]},
}
WIRE_JOB = JOB | {"max_price_per_hour": 2_000_000}  # the hub's API takes micros


class Tenant:
    """The tenant's CLI, with a home of its own (its key)."""

    def __init__(self, provider: Provider, hub: HubProcess, root: Path):
        self.provider, self.hub, self.root = provider, hub, root

    def __call__(self, *args: str):
        return self.provider.cli("--home", str(self.root), "hub", *args, timeout=60)

    def order(self, tmp_path: Path, spec: dict, deposit: float, *extra: str) -> dict:
        path = tmp_path / f"order-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(spec))
        done = self("order", self.hub.url, str(path), "--deposit", str(deposit), "--json", *extra)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)

    def order_of(self, order_id: str) -> dict:
        done = self("orders", self.hub.url, "--json")
        assert done.returncode == 0, done.stderr
        return next(o for o in json.loads(done.stdout) if o["id"] == order_id)

    def lease(self, lease_id: str) -> dict:
        done = self("leases", self.hub.url, "--json")
        assert done.returncode == 0, done.stderr
        return next((lease for lease in json.loads(done.stdout) if lease["id"] == lease_id), {})


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    """A hub, a provider it admits (A), one it cannot prove (B), and a funded tenant."""
    root = tmp_path_factory.mktemp("market")
    hub = HubProcess(
        root / "hub",
        free_port(),
        "--auction-window-s",
        "0.5",
        "--heartbeat-s",
        "1",
        "--allow-simulated",
        "--dispatch-timeout-s",
        "2",
    )
    providers = []
    try:  # whatever fails while setting up, nothing started is left running
        for name, api_url in (("a", ""), ("b", f"http://127.0.0.1:{free_port()}")):
            port, gateway_port = free_port(), free_port()
            gateway = gateway_port if name == "a" else None
            home = make_home(root / name, port, gateway_port=gateway)
            market_home(home, hub.url, hub.key, PRICES, api_url=api_url)
            named = f'node_name = "provider-{name}"'
            home.config.write_text(home.config.read_text().replace('node_name = ""', named))
            provider = Provider(home, port)
            providers.append(provider)
            provider.start()
            provider.gateway = f"http://127.0.0.1:{gateway_port}"
        a, b = providers
        tenant = Tenant(a, hub, root / "tenant")
        done = tenant("register", hub.url, "alice")
        assert done.returncode == 0, done.stderr
        done = a.cli("hub", "deposit", hub.url, "alice", "100", "--dir", str(hub.folder))
        assert done.returncode == 0, done.stderr
        yield hub, a, b, tenant
    finally:
        for provider in providers:
            provider.cancel_all()
            provider.stop(signal.SIGKILL)
            kill_task_processes(provider.home)
        hub.stop()


def reach(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        return httpx.get(url, headers=headers, timeout=5).status_code
    except httpx.TransportError:  # the gateway is still starting
        return 0


def our_lease(provider, lease_id: str) -> dict:
    return next(x for x in provider.api.get("/market/leases").json() if x["id"] == lease_id)


def market_status(provider) -> dict:
    return provider.api.get("/market").json()[0]


def ledger(hub) -> dict:
    return hub.admin.get("/v1/admin/ledger").json()


@pytest.mark.slow
def test_a_provider_is_admitted_only_once_its_gpus_are_proven(market):
    hub, a, b, _ = market
    wait_for(
        lambda: market_status(a)["status"] == "admitted",
        timeout=60,
        what="provider a to be admitted",
    )
    refused = wait_for(
        lambda: market_status(b)["status"] == "refused" and market_status(b),
        timeout=60,
        what="provider b to be refused",
    )
    assert "cannot reach" in refused["status_reason"]
    # the hub's verdicts are stored on a, signed by the hub's key, which a trusts
    proofs = [g["proof"] for g in a.api.get("/gpus").json()]
    assert all(p and p["passed"] and p["trusted"] and p["verifier_key"] == hub.key for p in proofs)


@pytest.mark.slow
def test_a_job_is_matched_runs_is_billed_and_both_sides_agree(market, tmp_path):
    hub, a, b, tenant = market
    wait_for(lambda: market_status(a)["status"] == "admitted", timeout=60, what="admission")
    made = tenant.order(tmp_path, JOB, deposit=5)
    lease = wait_for(
        lambda: (x := tenant.lease(made["id"])) and x["state"] == "closed" and x,
        timeout=60,
        what="the job's lease to close",
    )
    assert lease["close_reason"] == "completed", lease
    assert lease["price_per_hour"] == 1_830_000  # a's price, under the cap
    assert lease["charged"] == charge(1_830_000, lease["billed_s"]) > 0
    ours = next(x for x in a.api.get("/market/leases").json() if x["id"] == made["id"])
    assert ours["state"] == "closed" and ours["usage_records"] >= 1
    # usage both sides saw: the records a signed, and the seconds the hub billed
    assert ours["usage_gpu_seconds"] == pytest.approx(lease["reported_gpu_seconds"])
    assert lease["reported_gpu_seconds"] == pytest.approx(lease["billed_s"], abs=0.5)
    assert not any(x["id"] == made["id"] for x in b.api.get("/market/leases").json())
    books = ledger(hub)
    assert books["drift"] == 0 and books["held"] == books["deposited"] == 100_000_000
    assert books["accounts"][f"escrow:{made['id']}"] == 0  # the rest went back


@pytest.mark.slow
def test_a_tenants_failing_job_shows_why_and_costs_the_provider_nothing(market, tmp_path):
    """A job that exits 3 closes `work_failed`: its tenant reads why and the end of its
    output on the hub; the provider's reliability does not drop for it."""
    hub, a, _, tenant = market
    wait_for(lambda: market_status(a)["status"] == "admitted", timeout=60, what="admission")
    before = market_status(a)
    script = "import sys; print('loading weights'); print('boom: no GPU memory'); sys.exit(3)"
    made = tenant.order(
        tmp_path, JOB | {"payload": {"command": ["python3", "-c", script]}}, deposit=1
    )
    lease = wait_for(
        lambda: (x := tenant.lease(made["id"])) and x["state"] == "closed" and x,
        timeout=60,
        what="the failing job's lease to close",
    )
    assert lease["close_reason"] == "work_failed" and "exited with code 3" in lease["close_detail"]
    assert "boom: no GPU memory" in lease["log_tail"]
    shown = tenant("logs", hub.url, made["id"])
    assert shown.returncode == 0 and "boom: no GPU memory" in shown.stdout
    assert "running -> closed" in shown.stdout
    after = wait_for(
        lambda: (x := market_status(a))["reliability"] is not None and x, what="a heartbeat"
    )
    assert after["reliability"] >= (before["reliability"] or 0)  # not the provider's fault


@pytest.mark.slow
def test_a_win_the_provider_never_bid_on_is_refused(market):
    hub, a, _, _ = market
    wait_for(lambda: market_status(a)["status"] == "admitted", timeout=60, what="admission")
    # a hostile hub: it tells provider a it won an order it never saw, at 1 micro an hour
    db = sqlite3.connect(hub.folder / "hub.db")
    (key,) = db.execute("select key from participants where name='provider-a'").fetchone()
    forged = order(id="ord-forged").model_dump()
    db.execute(
        "insert into events (\"to\", kind, data, at) values (?, 'won', ?, ?)",
        (
            key,
            json.dumps({"lease_id": "ord-forged", "price_per_hour": 1, "order": forged}),
            time.time(),
        ),
    )
    db.commit()
    refused = wait_for(
        lambda: next(
            (x for x in a.api.get("/market/leases").json() if x["id"] == "ord-forged"), None
        ),
        what="provider a to see the forged win",
    )
    assert refused["state"] == "lost" and "never bid on it" in refused["reason"]
    assert refused["task_id"] is None  # nothing ran
    # told to the hub, which knows no such lease: nothing more to tell, no retrying
    wait_for(lambda: our_lease(a, "ord-forged")["reported"] == "closed", what="the refusal told")


@pytest.mark.slow
def test_orders_no_one_can_run_or_under_the_price_charge_nothing(market, tmp_path):
    hub, a, _, tenant = market
    wait_for(lambda: market_status(a)["status"] == "admitted", timeout=60, what="admission")
    before = ledger(hub)["accounts"]
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(JOB | {"resources": {"gpus": 8, "gpu_model": "h100"}}))
    done = tenant("order", hub.url, str(path), "--deposit", "1")
    assert done.returncode == 2 and "no provider can run this order now" in done.stderr
    assert "provider-a: 2 proven GPU(s) of h100, 8 wanted" in done.stderr  # the real cause
    cheap = tenant.order(tmp_path, JOB | {"max_price_per_hour": 1.0}, deposit=1)
    unmatched = wait_for(
        lambda: (o := tenant.order_of(cheap["id"]))["state"] == "unmatched" and o,
        what="the cheap order to go unmatched",
    )
    assert "no eligible bid" in unmatched["reason"]
    declined = next(x for x in a.api.get("/market/leases").json() if x["id"] == cheap["id"])
    assert declined["state"] == "lost" and "above the cap" in declined["reason"]
    assert ledger(hub)["accounts"] == before | {f"escrow:{cheap['id']}": 0}


@pytest.mark.slow
def test_a_lease_ends_when_its_deposit_runs_out_or_its_tenant_closes_it(market, tmp_path):
    hub, a, _, tenant = market
    wait_for(lambda: market_status(a)["status"] == "admitted", timeout=60, what="admission")
    forever = JOB | {"payload": {"command": ["sleep", "600"]}}
    poor = tenant.order(tmp_path, forever, deposit=0.002)  # ~4 s at 1.83 per hour
    closed = wait_for(
        lambda: (x := tenant.lease(poor["id"])) and x["state"] == "closed" and x,
        timeout=60,
        what="the poor lease to close",
    )
    assert closed["close_reason"] == "insufficient_funds"
    assert closed["charged"] == 2000 and closed["escrow"] == 0
    task = next(x for x in a.api.get("/market/leases").json() if x["id"] == poor["id"])["task_id"]
    assert a.task(task)["state"] == "cancelled"  # stopped on the provider too
    rich = tenant.order(tmp_path, forever, deposit=1)
    wait_for(
        lambda: tenant.lease(rich["id"]).get("state") == "running",
        timeout=60,
        what="the lease to run",
    )
    done = tenant("close", hub.url, rich["id"])
    assert done.returncode == 0, done.stderr
    closed = wait_for(
        lambda: (x := tenant.lease(rich["id"])) and x["state"] == "closed" and x,
        timeout=60,
        what="the closed lease",
    )
    assert closed["close_reason"] == "tenant" and closed["escrow"] == 0
    assert 0 < closed["charged"] < 1_000_000
    assert ledger(hub)["drift"] == 0


@pytest.mark.slow
def test_replayed_and_forged_requests_are_refused_and_change_nothing(market):
    hub, _a, _, _tenant = market
    body = json.dumps({"name": "mallory"}).encode()
    mallory = Ed25519PrivateKey.generate()
    headers = sign_request(mallory, "POST", "/v1/tenants", body) | {
        "Content-Type": "application/json"
    }
    first = httpx.post(hub.url + "/v1/tenants", content=body, headers=headers)
    assert first.status_code == 200
    again = httpx.post(hub.url + "/v1/tenants", content=body, headers=headers)
    assert again.status_code == 403 and "replayed" in again.text
    # a provider's key posting as a tenant, and a tenant posting a bid: refused
    forged = sign_request(mallory, "POST", "/v1/orders/ord-x/bids", b"{}")
    answer = httpx.post(hub.url + "/v1/orders/ord-x/bids", content=b"{}", headers=forged)
    assert answer.status_code == 403 and "no provider registered" in answer.text
    # an order paid with more than the tenant has
    order_body = json.dumps({"order": WIRE_JOB, "deposit": 10**12}).encode()
    signed = sign_request(mallory, "POST", "/v1/orders", order_body)
    answer = httpx.post(hub.url + "/v1/orders", content=order_body, headers=signed)
    assert answer.status_code == 422 and "more than your balance" in answer.text
    assert ledger(hub)["drift"] == 0


@pytest.mark.slow
def test_price_quote_shows_what_an_order_costs_here(market, tmp_path):
    _, a, _, _ = market
    path = tmp_path / "order.json"
    path.write_text(json.dumps({"resources": {"gpus": 2, "gpu_model": "h100"}, "duration_s": 30}))
    done = a.cli("price", "quote", str(path), "--json")
    assert done.returncode == 0, done.stderr
    rows = {r["model"]: r for r in json.loads(done.stdout)}
    assert rows["h100-80gb-sxm"]["price_per_hour"] == 3_660_000
    assert rows["h100-80gb-sxm"]["billed_s"] == 60  # the minimum duration
    assert rows["h100-80gb-pcie"]["price_per_hour"] == 3_660_000  # the family's price


@pytest.mark.slow
def test_a_restarted_provider_leaves_only_its_newest_verify_token_live(market):
    _, _, b, _ = market

    def market_tokens() -> list[dict]:
        return [x for x in b.api.get("/tokens").json() if x["name"].startswith("market-hub-")]

    wait_for(lambda: len(market_tokens()) == 1, timeout=60, what="b to register")
    b.stop()
    b.start()
    wait_for(lambda: len(market_tokens()) == 2, timeout=60, what="b to register again")
    wait_for(
        lambda: [t["revoked_at"] is None for t in market_tokens()].count(True) == 1,
        timeout=30,
        what="the first token to be revoked",
    )


@pytest.mark.slow
def test_the_provider_shows_its_markets_and_earnings(market):
    _, a, _, _ = market
    status = a.cli("market", "status")
    assert status.returncode == 0 and "admitted" in status.stdout
    earnings = json.loads(a.cli("market", "earnings", "--json").stdout)[0]
    # both count from when the hub heard the lease run to when its task stopped (or the
    # hub stopped billing): they differ by the messages' latency only
    assert earnings["earned_by_our_count"] == pytest.approx(earnings["paid_by_the_hub"], rel=0.05)
    assert earnings["paid_by_the_hub"] > 0


@pytest.mark.slow
def test_dispatched_orders_and_a_payload_that_never_comes(market, tmp_path):
    hub, a, _, tenant = market
    wait_for(lambda: market_status(a)["status"] == "admitted", timeout=60, what="admission")
    pushed = tenant.order(tmp_path, JOB, 1, "--dispatch")
    assert pushed["mode"] == "dispatch"
    done = wait_for(
        lambda: (x := tenant.lease(pushed["id"])) and x["state"] == "closed" and x,
        timeout=60,
        what="the dispatched lease to close",
    )
    assert done["close_reason"] == "completed" and done["charged"] > 0
    empty = tenant.order(tmp_path, JOB | {"payload": None, "payload_timeout_s": 1}, 1)
    waited = wait_for(
        lambda: (x := tenant.lease(empty["id"])) and x["state"] == "closed" and x,
        timeout=60,
        what="the lease without payload to close",
    )
    assert waited["close_reason"] == "payload_timeout" and waited["charged"] == 0
    assert waited["escrow"] == 0 and ledger(hub)["drift"] == 0


@pytest.mark.slow
def test_the_operators_preemptible_work_gives_way_to_a_service_lease(market, tmp_path):
    hub, a, _, tenant = market
    wait_for(lambda: market_status(a)["status"] == "admitted", timeout=60, what="admission")
    own = a.submit(
        name="own-batch", command=["sleep", "600"], preemptible=True, resources={"gpu": "H100:2"}
    )
    a.wait_state(own["id"], "running")
    serve = "exec python3 -m http.server --bind 127.0.0.1 $GPUPROVIDER_PORT_HTTP"
    service = JOB | {
        "kind": "service",
        "payload": {
            "command": ["/bin/sh", "-c", serve],
            "ports": ["http"],
            "serve": {"port": "http"},  # token auth: only the lease's tenant calls it
        },
    }
    made = tenant.order(tmp_path, service, deposit=1)
    running = wait_for(
        lambda: (x := tenant.lease(made["id"])) and x["state"] == "running" and x,
        timeout=60,
        what="the service lease to run",
    )
    assert "lease-" in running["endpoint"]  # where the tenant reaches it, behind the gateway
    assert a.task(own["id"])["state"] in ("preempted", "queued")
    # the hub hands the tenant (and the tenant alone) a token for this service only
    token = running["access_token"]
    assert token.startswith("gpp_")
    shown = tenant("lease", hub.url, made["id"])
    assert shown.returncode == 0 and token in shown.stdout and "curl" in shown.stdout
    name = urlsplit(running["endpoint"]).hostname.split(".")[0]
    assert reach(f"{a.gateway}/s/{name}/") in (0, 401)  # no token: refused
    assert a.api.get("/tasks", headers={"Authorization": f"Bearer {token}"}).status_code == 403
    # requests through the gateway are metered: the hub sees what the provider counted
    called = {"Authorization": f"Bearer {token}"}
    for _ in range(3):
        wait_for(
            lambda: reach(f"{a.gateway}/s/{name}/", called) == 200, timeout=60, what="the service"
        )
    ours = wait_for(
        lambda: (x := our_lease(a, made["id"]))["usage_requests"] >= 3 and x,
        timeout=30,
        what="the requests in the provider's usage",
    )
    wait_for(
        lambda: tenant.lease(made["id"])["reported_requests"] >= ours["usage_requests"],
        timeout=30,
        what="the hub to see the requests",
    )
    assert tenant("close", hub.url, made["id"]).returncode == 0
    wait_for(
        lambda: tenant.lease(made["id"])["state"] == "closed",
        timeout=60,
        what="the service lease to close",
    )
    a.wait_state(own["id"], "running")  # the operator's work comes back
    a.api.post(f"/tasks/{own['id']}/cancel")
    revoked = [t for t in a.api.get("/tokens").json() if t["name"].startswith("lease-")]
    assert revoked and all(t["revoked_at"] for t in revoked)  # its token ended with it


@pytest.mark.slow
def test_a_hub_that_disappears_mid_lease_neither_loses_nor_double_counts(market, tmp_path):
    hub, a, _, tenant = market
    wait_for(lambda: market_status(a)["status"] == "admitted", timeout=60, what="admission")
    made = tenant.order(tmp_path, JOB | {"payload": {"command": ["sleep", "6"]}}, deposit=1)
    wait_for(
        lambda: tenant.lease(made["id"]).get("state") == "running",
        timeout=60,
        what="the lease to run",
    )
    hub.stop()
    time.sleep(3)  # the outage itself: the provider's reports and beats fail meanwhile
    hub.start()
    done = wait_for(
        lambda: (x := tenant.lease(made["id"])) and x["state"] == "closed" and x,
        timeout=60,
        what="the lease to close after the outage",
    )
    assert done["close_reason"] == "completed"
    assert 0 < done["charged"] <= charge(1_830_000, 7) and done["escrow"] == 0
    assert ledger(hub)["drift"] == 0


# -- GPU identity for offers ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "memory_mib", "pci", "model", "in_catalogue"),
    [
        ("NVIDIA A100-SXM4-80GB", 81920, 0x20B2, "a100-80gb-sxm", True),
        ("NVIDIA A100 80GB HBM2e", 81920, 0x20B2, "a100-80gb-sxm", True),  # renamed
        ("NVIDIA GeForce RTX 4090", 24564, 0x2684, "rtx-4090-24gb", True),  # any subsystem
        ("NVIDIA RTX A5000", 24564, 0x2231, "rtx-a5000-24gb", False),
        ("NVIDIA GB10", 124000, 0x2E12, "gb10-121gb", False),
        ("NVIDIA H100 80GB HBM3", 81559, None, "h100-80gb-sxm", True),  # by name alone
    ],
)
def test_gpus_are_named_by_pci_id_and_unknown_ones_are_still_offered(
    name, memory_mib, pci, model, in_catalogue
):
    found, _ = catalogue.from_device_name(name, memory_mib, pci)
    assert found == model and catalogue.known(found) is in_catalogue
    # Akash offered an unknown model to no one; here an order for any GPU takes it, and
    # a price for its own name prices it
    assert OrderResources(gpus=1).accepts(found)
    table = PriceTable(gpu_hour={found: 0.27})
    assert quote_table(table, order(resources={"gpus": 1}), found).price_per_hour == 270_000


def test_an_order_for_a_model_takes_only_that_model():
    h100 = OrderResources(gpus=1, gpu_model="h100")
    assert h100.accepts("h100-80gb-pcie") and not h100.accepts("rtx-a5000-24gb")


@pytest.fixture(params=["sqlite", "postgresql"])
def hub_store(request, tmp_path):
    if request.param == "sqlite":
        yield HubStore(f"sqlite:///{tmp_path / 'hub.db'}")
    else:
        yield HubStore(request.getfixturevalue("postgres_url"))


def test_the_hub_keeps_its_books_on_sqlite_and_postgresql(hub_store):
    hub = Hub(hub_store, HubSettings(), Ed25519PrivateKey.generate())
    tenant = public_key_hex(Ed25519PrivateKey.generate())
    hub.register(tenant, "tenant", {"name": "alice"})
    hub.deposit({"tenant": "alice", "amount": 5_000_000})
    with pytest.raises(HubError, match=r"no provider can run this order now \(no provider is"):
        hub.post_order(tenant, {"order": WIRE_JOB, "deposit": 1_000_000})
    with pytest.raises(HubError, match="no tenant"):
        hub.deposit({"tenant": "bob", "amount": 1})
    books = hub.ledger_summary()
    assert books["deposited"] == books["held"] == 5_000_000 and books["drift"] == 0
    assert hub.describe(tenant)["balance"] == 5_000_000  # the refused order took nothing


def test_a_won_lease_that_never_runs_is_closed_and_refunded(hub_store):
    hub = Hub(hub_store, HubSettings(start_timeout_s=10, close_grace_s=5), KEY)
    provider, tenant = (public_key_hex(Ed25519PrivateKey.generate()) for _ in range(2))
    hub.register(
        provider, "provider", {"name": "p", "api_url": "http://127.0.0.1:9", "verify_token": "t"}
    )
    with hub_store.tx() as conn:  # admitted by hand: admission is tested end to end above
        conn.execute(
            update(hub_tables.participants)
            .where(hub_tables.participants.c.key == provider)
            .values(
                status="admitted",
                gpus=[{"uuid": "GPU-0", "model": "h100-80gb-sxm"}],
                last_heartbeat=time.time() + 86400,
            )
        )
    hub.register(tenant, "tenant", {"name": "alice"})
    hub.deposit({"tenant": "alice", "amount": 5_000_000})
    made = hub.post_order(tenant, {"order": WIRE_JOB, "deposit": 1_000_000})
    hub.bid(provider, made["id"], {"price_per_hour": 1_000_000})
    now = time.time()
    hub.tick(now + 3)  # the auction window is over
    assert hub.lease_view(made["id"])["state"] == "won"
    hub.tick(now + 20)  # never reported running: the hub asks it closed
    hub.tick(now + 30)  # and the provider never confirms
    lease = hub.lease_view(made["id"])
    assert (lease["state"], lease["close_reason"], lease["escrow"]) == ("closed", "failed", 0)
    assert hub.describe(tenant)["balance"] == 5_000_000 and hub.ledger_summary()["drift"] == 0


class Dice:
    def __init__(self, value: float):
        self.value = value

    def random(self) -> float:
        return self.value


def test_admitted_providers_are_proven_again_at_random_times_when_idle(hub_store):
    hub = Hub(hub_store, HubSettings(rechallenge_s=3600), KEY)
    provider = public_key_hex(Ed25519PrivateKey.generate())
    hub.register(
        provider, "provider", {"name": "p", "api_url": "http://127.0.0.1:9", "verify_token": "t"}
    )
    now = time.time()
    with hub_store.tx() as conn:
        conn.execute(
            update(hub_tables.participants)
            .where(hub_tables.participants.c.key == provider)
            .values(status="admitted", last_proof_at=now - 1000)
        )
    assert hub.due_for_proof(now, 0.1, Dice(0.0)) == [provider]
    assert hub.due_for_proof(now, 0.1, Dice(0.999)) == []  # not this time
    assert hub.due_for_proof(now - 700, 0.1, Dice(0.0)) == []  # just proven: not yet
    with hub_store.tx() as conn:  # a lease running: its GPUs are busy
        conn.execute(
            hub_tables.leases.insert().values(
                id="ord-x",
                tenant="t",
                provider=provider,
                state="running",
                price_per_hour=1,
                gpus=1,
                duration_s=60,
                created_at=now,
            )
        )
    assert hub.due_for_proof(now, 0.1, Dice(0.0)) == []


@pytest.mark.slow
def test_hub_serve_keeps_its_books_on_postgresql(postgres_url, tmp_path):
    hub = HubProcess(tmp_path / "hub", free_port(), "--db", postgres_url)
    try:
        tenant = HubClient(hub.url, Ed25519PrivateKey.generate())
        tenant.call("POST", "/v1/tenants", {"name": "pg-tenant"})
        answer = hub.admin.post("/v1/admin/deposit", json={"tenant": "pg-tenant", "amount": 7})
        assert answer.status_code == 200, answer.text
        assert tenant.call("GET", "/v1/me")["balance"] == 7
        books = hub.admin.get("/v1/admin/ledger").json()
        assert books["deposited"] == books["held"] == 7 and books["drift"] == 0
    finally:
        hub.stop()
