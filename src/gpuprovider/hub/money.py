"""How money moves for a lease: escrow accrues to the provider while the lease runs,
and what is left goes back to the tenant when it ends. Every move is a ledger transfer
(two postings summing to zero) in the caller's transaction."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from gpuprovider.hub import store as t
from gpuprovider.hub.records import HubLease
from gpuprovider.hub.store import balance, new_id, post
from gpuprovider.market.model import (
    Transfer,
    charge,
    escrow_account,
    provider_account,
    tenant_account,
)


def accrue(conn: Connection, lease: HubLease, until: float, final: bool = False) -> int:
    """Move what the running lease owes up to `until` from escrow to the provider; what
    could not be paid (escrow ran out). `final`: the lease ends at `until`, and anything
    accrued beyond it is returned."""
    row = conn.execute(select(t.leases).where(t.leases.c.id == lease.id)).one()  # as it is now
    if row.running_at is None:
        return 0
    seconds = min(max(0.0, until - row.running_at), float(row.duration_s))
    owed = charge(row.price_per_hour, seconds) - row.charged
    if owed < 0 and final:
        # the work ended before the hub heard (it was down, or the report was slow):
        # what was accrued past the end goes back to escrow, and from there the tenant
        back = min(-owed, balance(conn, provider_account(row.provider)))
        if back > 0:
            post(
                conn,
                Transfer(
                    new_id("cor"),
                    provider_account(row.provider),
                    escrow_account(row.id),
                    back,
                    "accrued past the end",
                ),
            )
        _billed(conn, lease, row.charged - back, seconds)
        return 0
    if owed <= 0:
        return 0
    paid = min(owed, balance(conn, escrow_account(row.id)))
    if paid > 0:
        post(
            conn,
            Transfer(
                new_id("pay"),
                escrow_account(row.id),
                provider_account(row.provider),
                paid,
                "accrual",
            ),
        )
    _billed(conn, lease, row.charged + paid, seconds)
    return owed - paid


def _billed(conn: Connection, lease: HubLease, charged: int, seconds: float) -> None:
    conn.execute(
        update(t.leases).where(t.leases.c.id == lease.id).values(charged=charged, billed_s=seconds)
    )
    lease.charged, lease.billed_s = charged, seconds


def refund(conn: Connection, lease_or_order: str, tenant: str) -> None:
    """What is left in the escrow of a lease (or an unmatched order) goes back."""
    left = balance(conn, escrow_account(lease_or_order))
    if left > 0:
        post(
            conn,
            Transfer(
                new_id("ref"),
                escrow_account(lease_or_order),
                tenant_account(tenant),
                left,
                "refund",
            ),
        )
