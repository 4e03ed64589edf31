"""A market lease on the provider, with no daemon and no hub: its rules on the lifecycle
kernel, what its task's and service's transitions cause for it (in their transaction),
a win that is all or nothing whatever fails in between, and reporting that one bad
lease never stops for the others."""

from __future__ import annotations

import time
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Connection

from gpuprovider.backends.base import Exit
from gpuprovider.config import ConfigError, load_config
from gpuprovider.domain.records import OwnerKind
from gpuprovider.domain.services import ServiceState
from gpuprovider.domain.states import TaskState
from gpuprovider.lifecycle import leases
from gpuprovider.lifecycle.kernel import IllegalTransition
from gpuprovider.market.client import Event, MarketRefused, MarketUnreachable
from gpuprovider.market.model import Action, CloseReason, LeaseState, Order, Reported
from gpuprovider.market.strategy import offer
from gpuprovider.market.usage import check_chain
from gpuprovider.testing import MARKET_JOB as JOB
from gpuprovider.testing import MarketWorld

L = LeaseState
KEY = Ed25519PrivateKey.generate()
SERVICE = JOB | {"kind": "service", "payload": {"command": ["serve"], "ports": ["http"]}}


@pytest.fixture
def market(tmp_path):
    made = MarketWorld(tmp_path, KEY)
    yield made
    made.store.close()


def test_a_win_starts_its_task_and_the_task_moves_the_lease(market):
    market.won()
    lease = market.lease()
    task = market.task_of()
    assert lease.state == L.PROVISIONING and lease.price_per_hour == 1_100_000  # GPU and CPU
    assert task.state == TaskState.QUEUED and task.owner_kind == OwnerKind.LEASE
    assert task.owner_id == "ord-1" and task.tenant == "market-hub"
    market.run(task)  # its task runs: the lease runs, in the same transaction
    assert market.lease().state == L.RUNNING
    market.end(market.get(task.id), Exit(0, "exited with code 0"))
    closed = market.lease()
    assert closed.state == L.CLOSED and closed.close_reason == CloseReason.COMPLETED
    assert closed.ended_at is not None and "succeeded" in closed.reason
    assert market.history() == [
        (None, "bidding"),
        ("bidding", "won"),
        ("won", "provisioning"),
        ("provisioning", "running"),
        ("running", "closed"),
    ]


@pytest.mark.parametrize(
    ("ended", "why"),
    [
        (Exit(127, "exited with code 127"), CloseReason.WORK_FAILED),  # the tenant's own
        (Exit(None, "exceeded its max duration (600s)", timed_out=True), CloseReason.EXPIRED),
        (Exit(None, "lost: node n-test died", lost=True), CloseReason.FAILED),
    ],
)
def test_how_its_task_ended_says_whose_fault_the_close_is(market, ended, why):
    market.won()
    task = market.task_of()
    market.run(task)
    market.end(market.get(task.id), ended)
    assert market.lease().close_reason == why


def test_a_lease_the_market_closes_stops_its_task_and_closes_once_it_stopped(market):
    market.won()
    task = market.task_of()
    market.run(task)
    market.service.on_close("ord-1", "tenant")
    assert market.lease().state == L.CLOSING
    assert market.get(task.id).state == TaskState.CANCELLING  # in the same transaction
    market.end(market.get(task.id), Exit(None, "stopped on request", stopped=True))
    closed = market.lease()
    assert closed.state == L.CLOSED and closed.close_reason == CloseReason.TENANT


def test_a_lease_closed_before_its_task_started_closes_at_once(market):
    market.won()
    market.service.on_close("ord-1", "insufficient_funds")
    lease = market.lease()
    assert lease.state == L.CLOSED and lease.close_reason == CloseReason.INSUFFICIENT_FUNDS
    assert market.task_of().state == TaskState.CANCELLED
    assert market.history()[-2:] == [("provisioning", "closing"), ("closing", "closed")]


def test_a_closed_lease_is_never_reopened_and_nothing_is_written(market):
    market.won()
    market.service.on_close("ord-1", "tenant")
    before = market.history()
    with pytest.raises(IllegalTransition, match="lease ord-1 cannot go from closed to running"):
        market.apply(leases.transition, market.lease(), L.RUNNING, "a hostile hub")
    assert market.history() == before and market.lease().state == L.CLOSED


@pytest.mark.parametrize(
    ("setup", "price", "why"),
    [
        ("never-bid", 1_000_000, "never bid on it"),
        ("declined", 1_000_000, "declined it"),
        ("bid", 1, "below this provider's price"),
    ],
)
def test_a_win_it_never_agreed_to_is_refused_and_reported_closed(market, setup, price, why):
    if setup == "declined":  # over the cap: declined
        market.service.on_order({"order": JOB | {"id": "ord-1", "max_price_per_hour": 1}})
    elif setup == "bid":
        market.service.on_order({"order": JOB | {"id": "ord-1"}})
    market.service.on_won("ord-1", price, JOB | {"id": "ord-1"})
    lease = market.lease()
    assert lease.state == L.LOST and lease.reported == Reported.REFUSE and lease.task_id is None
    with market.store.read() as r:
        assert why in r.market.history("ord-1")[-1].reason
        assert r.tasks.find() == []
    market.service.report()
    assert market.connector.states == [
        ("ord-1", "closed", pytest.approx(market.connector.states[0][2]))
    ]
    assert market.lease().reported == Reported.CLOSED


class Faults:
    """Fails the Nth statement executed on the store from now on (then none)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int):
        self.count, self.at = 0, at
        real = Connection.execute

        def execute(conn: Connection, *args: Any, **kwargs: Any) -> Any:
            self.count += 1
            if self.count == self.at:
                raise RuntimeError(f"injected fault at statement {self.at}")
            return real(conn, *args, **kwargs)

        monkeypatch.setattr(Connection, "execute", execute)


def statements(monkeypatch: pytest.MonkeyPatch, action: Any) -> int:
    with monkeypatch.context() as patch:
        counting = Faults(patch, at=0)
        action()
        return counting.count


@pytest.mark.parametrize("push", [False, True], ids=["hub", "swan"])
def test_a_win_is_all_or_nothing_whatever_fails_between_its_writes(tmp_path, monkeypatch, push):
    """A fault at every statement of the win in turn: the lease and its task are both
    there, or neither is (and the win, read again after the crash, runs once)."""
    probe = MarketWorld(tmp_path / "probe", KEY)
    probe.connector.pushes = push

    def win(world: MarketWorld) -> None:
        if push:
            world.service.accept_pushed(Order.model_validate(JOB | {"id": "ord-1"}))
        else:
            world.service.on_won("ord-1", 1_100_000, JOB | {"id": "ord-1"})

    if not push:
        probe.service.on_order({"order": JOB | {"id": "ord-1"}})
    total = statements(monkeypatch, lambda: win(probe))
    assert probe.lease().state == L.PROVISIONING and probe.task_of() is not None
    assert total > 5
    for at in range(1, total + 1):
        world = MarketWorld(tmp_path / f"fault-{at}", KEY)
        world.connector.pushes = push
        if not push:
            world.service.on_order({"order": JOB | {"id": "ord-1"}})
        with monkeypatch.context() as patch:
            Faults(patch, at)
            with pytest.raises(RuntimeError, match="injected fault"):
                win(world)
        lease = world.lease()
        with world.store.read() as r:
            made = r.tasks.find()
        if push:
            assert lease is None and made == []
        else:
            assert lease.state == L.BIDDING and lease.task_id is None and made == []
        win(world)  # the event read again after the crash: it runs, once
        with world.store.read() as r:
            assert len(r.tasks.find()) == 1
        assert world.lease().state == L.PROVISIONING
        world.store.close()
    probe.store.close()


def test_a_service_lease_runs_while_its_service_lives(market):
    market.won(order=SERVICE)
    lease = market.lease()
    assert lease.service_id and lease.state == L.PROVISIONING
    with market.store.read() as r:
        service = r.services.get(lease.service_id)
    assert service.owner_kind == OwnerKind.LEASE and service.state == ServiceState.STARTING
    replica = market.task_of()
    market.run(replica)
    assert market.lease().state == L.RUNNING  # the service went live: the lease runs
    market.service.on_close("ord-1", "tenant")
    assert market.lease().state == L.CLOSING
    market.end(market.get(replica.id), Exit(None, "stopped on request", stopped=True))
    closed = market.lease()
    assert closed.state == L.CLOSED and closed.close_reason == CloseReason.TENANT
    with market.store.read() as r:
        assert r.services.get(lease.service_id).state == ServiceState.STOPPED


def test_one_bad_lease_never_stops_the_others_being_billed(market):
    """The market refuses one lease's reports, does not answer another's, answers a
    third with garbage: the other seven are billed all the same, and the three are
    tried again with backoff."""
    ids = [f"ord-{i}" for i in range(10)]
    for lease_id in ids:
        market.won(lease_id, JOB | {"resources": {"gpus": 0}})  # CPU only: room for ten
        market.run(market.task_of(lease_id))
    market.connector.fail = {
        "ord-2": MarketRefused(409, "lease ord-2 is closed: no usage after its end"),
        "ord-5": MarketUnreachable("hub http://hub: ReadTimeout"),
        "ord-7": ValueError("answered badly: not JSON"),
    }
    market.service.report()
    time.sleep(0.01)  # some time to bill
    market.service.report()
    good = [i for i in ids if i not in market.connector.fail]
    assert {lease for lease, state, _ in market.connector.states} == set(good)
    assert all(len(market.connector.usage[i]) >= 1 for i in good)
    assert not set(market.connector.usage) & set(market.connector.fail)
    figures = market.service.figures
    assert set(figures.retrying) == set(market.connector.fail) and figures.report_errors >= 3
    assert all(r.at > time.time() for r in figures.retrying.values())  # backing off
    # the market takes them again: reported at their next try, the chains whole
    market.connector.fail = {}
    later = time.time() + 10
    market.service.report(later)  # its state: billed from when the market heard
    market.service.report(later + 1)  # and its usage since
    assert not figures.retrying
    for lease_id in ids:
        check_chain([u.model_dump() for u in market.connector.usage[lease_id]], KEY_HEX)


def test_a_refused_record_is_reconciled_with_what_the_market_holds(market):
    """The market stored a record and the provider crashed before it saved its place:
    the market refuses the same sequence again, saying what it holds; the provider goes
    on from there."""
    market.won(order=JOB | {"resources": {"gpus": 0}})
    market.run(market.task_of())
    market.service.report()  # running: billed from now
    market.service.report(time.time() + 0.5)  # the first record
    sent = market.connector.usage["ord-1"][-1]
    with market.store.tx() as tx:  # the crash: the provider forgets it sent it
        tx.market.update(tx.market.get("ord-1"), usage_seq=0, usage_hash="", usage_until=None)
    market.connector.fail["ord-1"] = MarketRefused(
        409, "record 1 is out of sequence; the next is 2", {"held": sent.model_dump()}
    )
    market.service.report(time.time() + 1)
    lease = market.lease()
    assert lease.usage_seq == sent.seq and lease.usage_hash == sent.hash
    assert not market.service.figures.retrying
    market.connector.fail = {}
    market.service.report(time.time() + 2)
    check_chain([u.model_dump() for u in market.connector.usage["ord-1"]], KEY_HEX)


def test_a_market_that_closed_the_lease_closes_it_here_too(market):
    market.won()
    market.run(market.task_of())
    market.connector.fail["ord-1"] = MarketRefused(
        409, "lease ord-1 is closed", {"lease_state": "closed", "close_reason": "expired"}
    )
    market.service.report(time.time() + 1)
    lease = market.lease()
    assert lease.state == L.CLOSING and lease.close_reason == CloseReason.EXPIRED
    assert market.get(lease.task_id).state == TaskState.CANCELLING


KEY_HEX = KEY.public_key().public_bytes_raw().hex()


def test_a_payload_that_never_comes_closes_the_lease(market):
    market.won(order=JOB | {"payload": None, "payload_timeout_s": 1})
    assert market.lease().state == L.AWAITING_PAYLOAD
    market.service.expire(time.time() + 0.5)
    assert market.lease().state == L.AWAITING_PAYLOAD  # not yet
    market.service.expire(time.time() + 2)
    lease = market.lease()
    assert lease.state == L.CLOSED and lease.close_reason == CloseReason.PAYLOAD_TIMEOUT
    market.service.report()
    assert market.connector.states[-1][:2] == ("ord-1", "closed")


# -- a strategy in the live daemon (#33: `[market.<name>] strategy`) --------------------


class Recording:
    """A strategy that bids the cap on the first option, and hears every outcome."""

    name = "recording"

    def __init__(self, fail: bool = False):
        self.fail, self.situations, self.outcomes = fail, [], []

    def decide(self, situation):
        if self.fail:
            raise RuntimeError("boom")
        self.situations.append(situation)
        option = next(o for o in situation.options if o.usable)
        price = situation.order.max_price_per_hour
        return offer(situation, option, price, "the cap, always", self.name)

    def observe(self, outcome):
        self.outcomes.append(outcome)


def test_a_strategy_answers_orders_from_the_live_cluster_and_hears_outcomes(market):
    strategy = market.service.strategy = Recording()
    market.service.handle(Event(1, "order", {"order": JOB | {"id": "ord-1"}, "mode": "auction"}))
    (seen,) = strategy.situations
    (option,) = seen.options  # the node's H100s, placed by the daemon's own scheduler
    assert option.model == "h100-80gb-sxm" and option.fits_now and option.quote is not None
    assert option.quote.price_per_hour == 1_100_000  # the built-in quote, for reference
    (order_id, bid), *_ = market.connector.bids
    assert order_id == "ord-1" and bid.price_per_hour == JOB["max_price_per_hour"]
    assert bid.expires_at > time.time()  # the market's bid_valid_s, not the strategy's
    assert market.lease().reason == "bid: the cap, always"
    won = {"lease_id": "ord-1", "price_per_hour": bid.price_per_hour, "order": JOB}
    market.service.handle(Event(2, "won", won | {"order": JOB | {"id": "ord-1"}}))
    assert market.lease().state == L.PROVISIONING
    assert [(o.order_id, o.won) for o in strategy.outcomes] == [("ord-1", True)]
    # the next order sees the lease it now runs
    market.service.handle(Event(3, "order", {"order": JOB | {"id": "ord-2"}, "mode": "auction"}))
    assert [v.id for v in strategy.situations[-1].leases] == ["ord-1"]
    market.service.handle(Event(4, "lost", {"order_id": "ord-2"}))
    assert strategy.outcomes[-1].order_id == "ord-2" and not strategy.outcomes[-1].won


def test_a_strategy_that_raises_gives_way_to_the_built_in_rule_and_says_so(market):
    market.service.strategy = Recording(fail=True)
    market.service.handle(Event(1, "order", {"order": JOB | {"id": "ord-1"}, "mode": "dispatch"}))
    (_, decision), *_ = market.connector.bids
    assert decision.action == Action.ACCEPT and decision.price_per_hour == 1_100_000
    reason = market.lease().reason
    assert "strategy recording failed (RuntimeError: boom)" in reason, reason
    assert market.lease().state == L.BIDDING  # answered; nothing stopped


def test_a_strategy_is_named_in_config_and_a_wrong_name_is_refused(tmp_path):
    path = tmp_path / "provider.toml"
    hub = '[market.hub]\nurl = "http://127.0.0.1:1"\nverifier_key = "' + "ab" * 32 + '"\n'
    path.write_text(hub + 'strategy = "earnings"\n')
    assert load_config(path).market["hub"].strategy == "earnings"
    path.write_text(hub + 'strategy = "greedy"\n')
    with pytest.raises(ConfigError, match="strategy"):
        load_config(path)
