"""The provider's side of market leases, the nonces of push markets' requests, and
where each market's event stream is."""

from __future__ import annotations

import builtins
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, delete, insert, or_, select, update

from gpuprovider.domain.records import JournalRow
from gpuprovider.lifecycle.kernel import Stale
from gpuprovider.market.model import LIVE, LeaseRecord, LeaseState, Reported, market_tenant
from gpuprovider.store import schema as t
from gpuprovider.store.rows import record

if TYPE_CHECKING:
    from gpuprovider.store.store import Tx

_COLUMNS = [t.market_leases.c[f.name] for f in fields(LeaseRecord)]
_LIVE = [s.value for s in LIVE]


def _lease(row: Any) -> LeaseRecord:
    lease = record(LeaseRecord, row)
    lease.state = LeaseState(lease.state)
    return lease


class MarketRepo:
    def __init__(self, tx: Tx):
        self.tx = tx

    # -- leases -----------------------------------------------------------------------

    def add(
        self,
        lease_id: str,
        market: str,
        state: LeaseState,
        order: dict[str, Any],
        reason: str,
        **values: Any,
    ) -> LeaseRecord:
        """A new lease in `state`, with its journal row saying `reason`."""
        now = self.tx.now
        self.tx.conn.execute(
            insert(t.market_leases).values(
                id=lease_id,
                market=market,
                state=state.value,
                order=order,
                reason=reason[:2000],
                created_at=now,
                updated_at=now,
                **values,
            )
        )
        self.tx.journal.write(
            "lease", lease_id, market_tenant(market), None, state.value, reason[:2000]
        )
        lease = self.get(lease_id)
        assert lease is not None
        return lease

    def get(self, lease_id: str) -> LeaseRecord | None:
        row = self.tx.conn.execute(
            select(*_COLUMNS).where(t.market_leases.c.id == lease_id)
        ).first()
        return _lease(row) if row else None

    def update(self, lease: LeaseRecord, **values: Any) -> None:
        """Change fields other than the state (the lifecycle changes that)."""
        if not values:
            return
        values["updated_at"] = self.tx.now
        self.tx.conn.execute(
            update(t.market_leases).where(t.market_leases.c.id == lease.id).values(**values)
        )
        for key, value in values.items():
            setattr(lease, key, value)

    def write_transition(
        self, lease: LeaseRecord, target: LeaseState, reason: str, changes: dict[str, Any]
    ) -> None:
        """Store a state change guarded by the state read, with its journal row."""
        values = dict(changes, state=target.value, updated_at=self.tx.now)
        done = self.tx.conn.execute(
            update(t.market_leases)
            .where(t.market_leases.c.id == lease.id, t.market_leases.c.state == lease.state.value)
            .values(**values)
        )
        if done.rowcount != 1:
            raise Stale("lease", lease.id)
        self.tx.journal.write(
            "lease", lease.id, lease.tenant, lease.state.value, target.value, reason[:2000]
        )
        for key, value in values.items():
            setattr(lease, key, value)
        lease.state = target

    def note(self, lease: LeaseRecord, reason: str) -> None:
        """What happened to a lease that left its state as it was (usage sent, ...)."""
        state = lease.state.value
        self.tx.journal.write("lease", lease.id, lease.tenant, state, state, reason[:2000])

    def list(
        self,
        market: str | None = None,
        states: set[LeaseState] | None = None,
        limit: int | None = None,
    ) -> list[LeaseRecord]:
        """Leases, oldest first (the newest `limit` of them, with a limit)."""
        c = t.market_leases.c
        query = select(*_COLUMNS)
        if market:
            query = query.where(c.market == market)
        if states:
            query = query.where(c.state.in_(sorted(s.value for s in states)))
        if limit:
            query = query.order_by(c.created_at.desc()).limit(limit)
            return [_lease(r) for r in reversed(self.tx.conn.execute(query).all())]
        return [_lease(r) for r in self.tx.conn.execute(query.order_by(c.created_at))]

    def to_report(self, market: str) -> builtins.list[LeaseRecord]:
        """The market's leases it must still hear of: live ones (their state, their
        usage), ended ones whose close it has not heard, refused wins."""
        c = t.market_leases.c
        query = (
            select(*_COLUMNS)
            .where(
                c.market == market,
                or_(
                    c.state.in_(_LIVE),
                    and_(
                        c.state == LeaseState.CLOSED.value,
                        c.reported != Reported.CLOSED.value,
                    ),
                    c.reported == Reported.REFUSE.value,
                ),
            )
            .order_by(c.created_at)
        )
        return [_lease(r) for r in self.tx.conn.execute(query)]

    def history(self, lease_id: str) -> builtins.list[JournalRow]:
        return self.tx.journal.of("lease", lease_id)

    # -- push markets' nonces ---------------------------------------------------------

    def use_nonce(self, market: str, nonce: str, expires_at: float) -> bool:
        """Record a signed request's nonce: False when it was used before (a replay).
        Expired ones are forgotten: a request past its expiry is refused anyway."""
        c = t.market_nonces.c
        self.tx.conn.execute(delete(t.market_nonces).where(c.expires_at < self.tx.now))
        used = self.tx.conn.execute(
            select(c.nonce).where(c.market == market, c.nonce == nonce)
        ).first()
        if used:
            return False
        self.tx.conn.execute(
            insert(t.market_nonces).values(market=market, nonce=nonce, expires_at=expires_at)
        )
        return True

    # -- event streams ----------------------------------------------------------------

    def cursor(self, market: str) -> dict[str, Any]:
        row = self.tx.conn.execute(
            select(t.market_cursors).where(t.market_cursors.c.market == market)
        ).first()
        if row is None:
            return {"market": market, "last_event": 0, "status": "", "status_reason": ""}
        return dict(row._mapping)

    def set_cursor(self, market: str, **values: Any) -> None:
        exists = self.tx.conn.execute(
            select(t.market_cursors.c.market).where(t.market_cursors.c.market == market)
        ).first()
        if exists:
            self.tx.conn.execute(
                update(t.market_cursors)
                .where(t.market_cursors.c.market == market)
                .values(updated_at=self.tx.now, **values)
            )
        else:
            self.tx.conn.execute(
                insert(t.market_cursors).values(market=market, updated_at=self.tx.now, **values)
            )
