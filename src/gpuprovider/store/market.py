"""The provider's side of market leases, and where each market's event stream is."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, insert, select, update

from gpuprovider.store import schema as t

if TYPE_CHECKING:
    from gpuprovider.store.store import Tx


class MarketRepo:
    def __init__(self, tx: Tx):
        self.tx = tx

    def add(self, lease_id: str, market: str, state: str, order: dict, **values: Any) -> None:
        now = self.tx.now
        self.tx.conn.execute(
            insert(t.market_leases).values(
                id=lease_id,
                market=market,
                state=state,
                order=order,
                created_at=now,
                updated_at=now,
                **values,
            )
        )

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

    def get(self, lease_id: str) -> dict[str, Any] | None:
        row = self.tx.conn.execute(
            select(t.market_leases).where(t.market_leases.c.id == lease_id)
        ).first()
        return dict(row._mapping) if row else None

    def set(self, lease_id: str, **values: Any) -> None:
        self.tx.conn.execute(
            update(t.market_leases)
            .where(t.market_leases.c.id == lease_id)
            .values(updated_at=self.tx.now, **values)
        )

    def list(self, market: str | None = None, states: set[str] | None = None) -> list[dict]:
        query = select(t.market_leases).order_by(t.market_leases.c.created_at)
        if market:
            query = query.where(t.market_leases.c.market == market)
        if states:
            query = query.where(t.market_leases.c.state.in_(sorted(states)))
        return [dict(r._mapping) for r in self.tx.conn.execute(query)]

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
