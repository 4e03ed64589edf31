"""The hub's aggregates on the lifecycle kernel: participants, orders and leases, each
a table of states and rules applied in the transaction that makes the change, each
change a row of the hub's journal.

A lease's rules move the money: closing stops billing where it stands and asks the
provider to stop; closing for good bills the last of it (unless billing stopped at
closing), returns what is left in escrow to the tenant, and counts the lease for or
against the provider's reliability (only a close that is the provider's fault counts
against it).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.engine import Connection

from gpuprovider.hub import store as t
from gpuprovider.hub.money import accrue, refund
from gpuprovider.hub.records import HubLease, HubOrder, OrderState, Participant, ParticipantStatus
from gpuprovider.hub.store import emit, write_journal
from gpuprovider.lifecycle.kernel import Change, Machine, Rule, Stale
from gpuprovider.market.model import PROVIDER_FAULT, TRANSITIONS, CloseReason, LeaseState

L = LeaseState
P = ParticipantStatus
O = OrderState  # noqa: E741 - a state table's initial, as L and P

PARTICIPANT_TRANSITIONS: dict[ParticipantStatus, frozenset[ParticipantStatus]] = {
    P.PENDING: frozenset({P.ADMITTED, P.REFUSED}),
    # registering again (a restarted provider) waits for its proof again
    P.ADMITTED: frozenset({P.PENDING, P.REFUSED}),
    P.REFUSED: frozenset({P.PENDING, P.ADMITTED}),
}
ORDER_TRANSITIONS: dict[OrderState, frozenset[OrderState]] = {
    O.OPEN: frozenset({O.MATCHED, O.UNMATCHED}),
    O.MATCHED: frozenset(),
    O.UNMATCHED: frozenset(),
}


def _guarded(
    conn: Connection, table: Any, key: str, column: str, read: str, values: dict[str, Any]
) -> None:
    """Write `values` to the row `key` of `table` if its `column` still says `read`."""
    primary = next(iter(table.primary_key.columns))
    done = conn.execute(
        update(table).where(primary == key, table.c[column] == read).values(**values)
    )
    if done.rowcount != 1:
        raise Stale(table.name, key)


# -- participants ---------------------------------------------------------------------


def _write_participant(
    conn: Connection, who: Participant, target: P, why: str, changes: dict[str, Any]
) -> None:
    values = dict(changes, status=target.value, status_reason=why[:2000])
    _guarded(conn, t.participants, who.key, "status", who.status.value, values)
    write_journal(conn, "participant", who.key, who.key, who.status.value, target.value, why)
    for key, value in changes.items():
        setattr(who, key, value)
    who.status, who.status_reason = target, why[:2000]


def _tell_admission(conn: Connection, who: Participant, change: Change[P]) -> None:
    emit(conn, who.key, "admission", {"status": change.target.value, "reason": change.reason})


PARTICIPANTS: Machine[Connection, Participant, P] = Machine(
    "participant",
    PARTICIPANT_TRANSITIONS,
    write=_write_participant,
    state_of=lambda who: who.status,
    subject_of=lambda who: who.key,
    rules=[
        Rule(
            "tell-admission",
            "a provider hears of its admission, and of its refusal, on its event stream",
            frozenset({P.ADMITTED, P.REFUSED}),
            then=_tell_admission,
        )
    ],
)


# -- orders -----------------------------------------------------------------------------


def _write_order(
    conn: Connection, order: HubOrder, target: O, why: str, changes: dict[str, Any]
) -> None:
    values = dict(changes, state=target.value)
    _guarded(conn, t.orders, order.id, "state", order.state.value, values)
    write_journal(conn, "order", order.id, order.tenant, order.state.value, target.value, why)
    for key, value in changes.items():
        setattr(order, key, value)
    order.state = target


def _refund_unmatched(conn: Connection, order: HubOrder, change: Change[O]) -> None:
    refund(conn, order.id, order.tenant)


ORDERS: Machine[Connection, HubOrder, O] = Machine(
    "order",
    ORDER_TRANSITIONS,
    write=_write_order,
    state_of=lambda order: order.state,
    subject_of=lambda order: order.id,
    rules=[
        Rule(
            "refund",
            "an order no one took gives its deposit back",
            frozenset({O.UNMATCHED}),
            then=_refund_unmatched,
        )
    ],
)


# -- leases -----------------------------------------------------------------------------


def _write_lease(
    conn: Connection, lease: HubLease, target: L, why: str, changes: dict[str, Any]
) -> None:
    values = dict(changes, state=target.value)
    _guarded(conn, t.leases, lease.id, "state", lease.state.value, values)
    write_journal(conn, "lease", lease.id, lease.tenant, lease.state.value, target.value, why)
    for key, value in changes.items():
        setattr(lease, key, value)
    lease.state = target


def counts_against(reason: str) -> bool:
    """Whether a lease closed for `reason` counts against its provider's reliability:
    only what the provider failed to do, never the tenant's own work failing."""
    return reason in {r.value for r in PROVIDER_FAULT}


def _stop_billing(conn: Connection, lease: HubLease, change: Change[L]) -> None:
    assert lease.closing_at is not None
    accrue(conn, lease, lease.closing_at)


def _ask_provider(conn: Connection, lease: HubLease, change: Change[L]) -> None:
    emit(conn, lease.provider, "close", {"lease_id": lease.id, "reason": lease.close_reason})


def _settle(conn: Connection, lease: HubLease, change: Change[L]) -> None:
    if change.source != L.CLOSING:  # billing stopped at closing otherwise
        assert lease.closed_at is not None
        accrue(conn, lease, lease.closed_at, final=True)
    refund(conn, lease.id, lease.tenant)


def _count(conn: Connection, lease: HubLease, change: Change[L]) -> None:
    column = "failed" if counts_against(lease.close_reason) else "completed"
    conn.execute(
        update(t.participants)
        .where(t.participants.c.key == lease.provider)
        .values({column: getattr(t.participants.c, column) + 1})
    )


LEASES: Machine[Connection, HubLease, L] = Machine(
    "lease",
    TRANSITIONS,
    write=_write_lease,
    state_of=lambda lease: lease.state,
    subject_of=lambda lease: lease.id,
    rules=[
        Rule(
            "stop-billing",
            "a closing lease is billed up to when it began closing, and no further",
            frozenset({L.CLOSING}),
            then=_stop_billing,
        ),
        Rule(
            "ask-provider",
            "the provider is asked to stop the lease's work",
            frozenset({L.CLOSING}),
            then=_ask_provider,
        ),
        Rule(
            "settle",
            "a closed lease is billed to its end (unless it was closing), and what is left "
            "in escrow goes back to the tenant",
            frozenset({L.CLOSED}),
            then=_settle,
        ),
        Rule(
            "count-reliability",
            "the provider's record counts the close: against it only if it was its fault",
            frozenset({L.CLOSED}),
            then=_count,
        ),
    ],
)


def closing(conn: Connection, lease: HubLease, why: CloseReason, detail: str, now: float) -> None:
    """The hub ends a live lease: billing stops now, the provider is asked to stop."""
    LEASES.transition(
        conn, lease, L.CLOSING, detail, close_reason=why.value, close_detail=detail, closing_at=now
    )


def closed(
    conn: Connection, lease: HubLease, why: CloseReason, detail: str, at: float, **more: Any
) -> None:
    """The lease is over, its work stopped at `at`: the reason the hub asked for (if it
    was closing) stands."""
    reason = lease.close_reason if lease.state == L.CLOSING and lease.close_reason else why.value
    LEASES.transition(
        conn,
        lease,
        L.CLOSED,
        detail or lease.close_detail,
        close_reason=reason,
        close_detail=detail or lease.close_detail,
        closed_at=at,
        **more,
    )
