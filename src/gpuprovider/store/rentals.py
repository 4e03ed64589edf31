"""Rentals: environments tenants log in to over SSH. Their history is in the journal."""

from __future__ import annotations

import builtins
import secrets
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select, update

from gpuprovider.domain.records import JournalRow
from gpuprovider.domain.rentals import RentalRecord, RentalSpec, RentalState
from gpuprovider.lifecycle.kernel import Stale
from gpuprovider.store import schema as t
from gpuprovider.store.rows import record

if TYPE_CHECKING:
    from gpuprovider.store.store import Tx

_COLUMNS = [t.rentals.c[f.name] for f in fields(RentalRecord)]


def _rental(row: Any) -> RentalRecord:
    rental = record(RentalRecord, row)
    rental.state = RentalState(rental.state)
    rental.ports = dict(rental.ports or {})
    return rental


class RentalRepo:
    def __init__(self, tx: Tx):
        self.tx = tx

    def insert(
        self,
        spec: RentalSpec,
        tenant: str,
        ssh_port: int,
        ports: dict[str, int],
        disk_path: str,
        host_key: str,
        expires_at: float | None,
        rental_id: str | None = None,
    ) -> RentalRecord:
        """A new rental, provisioning, with its journal row. IntegrityError when a rental
        not deleted has the name, or the SSH port is taken."""
        values: dict[str, Any] = dict(
            id=rental_id or new_rental_id(),
            name=spec.name,
            live_name=spec.name,
            tenant=tenant,
            state=RentalState.PROVISIONING.value,
            state_reason=f"requested by {tenant}",
            spec=spec.model_dump(mode="json", exclude_defaults=True),
            ssh_port=ssh_port,
            ports=ports,
            disk_path=disk_path,
            host_key=host_key,
            node_id=None,
            task_id=None,
            starts=0,
            requested_at=self.tx.now,
            ready_s=None,
            expires_at=expires_at,
            created_at=self.tx.now,
            updated_at=self.tx.now,
        )
        self.tx.conn.execute(insert(t.rentals).values(**values))
        values.pop("live_name")
        rental = RentalRecord(**values)
        rental.state = RentalState.PROVISIONING
        self.tx.journal.write(
            "rental", rental.id, tenant, None, rental.state.value, rental.state_reason
        )
        return rental

    def get(self, ref: str, tenant: str | None = None) -> RentalRecord | None:
        """A rental by id, else the one not deleted of that name (else the latest)."""
        c = t.rentals.c
        query = select(*_COLUMNS).where((c.id == ref) | (c.name == ref))
        if tenant is not None:
            query = query.where(c.tenant == tenant)
        query = query.order_by(
            (c.id == ref).desc(), (c.state != RentalState.DELETED.value).desc(), c.created_at.desc()
        )
        row = self.tx.conn.execute(query.limit(1)).first()
        return _rental(row) if row else None

    def list(self, tenant: str | None = None, deleted: bool = False) -> list[RentalRecord]:
        c = t.rentals.c
        query = select(*_COLUMNS).order_by(c.name, c.created_at)
        if tenant is not None:
            query = query.where(c.tenant == tenant)
        if not deleted:
            query = query.where(c.state != RentalState.DELETED.value)
        return [_rental(r) for r in self.tx.conn.execute(query)]

    def ports_taken(self) -> set[int]:
        """Every port a rental not deleted holds (its SSH port and its TCP ports)."""
        taken: set[int] = set()
        for rental in self.list():
            if rental.ssh_port is not None:
                taken.add(rental.ssh_port)
            taken.update(rental.ports.values())
        return taken

    def update(self, rental: RentalRecord, **changes: Any) -> None:
        """Change fields other than the state (the lifecycle changes that)."""
        self.tx.conn.execute(
            update(t.rentals)
            .where(t.rentals.c.id == rental.id)
            .values(updated_at=self.tx.now, **changes)
        )
        for key, value in changes.items():
            setattr(rental, key, value)

    def write_transition(
        self, rental: RentalRecord, target: RentalState, reason: str, changes: dict[str, Any]
    ) -> None:
        """Store a state change guarded by the state read, with its journal row."""
        values = dict(changes, state=target.value, state_reason=reason, updated_at=self.tx.now)
        if target == RentalState.DELETED:
            values["live_name"] = None
            values["ssh_port"] = None
        done = self.tx.conn.execute(
            update(t.rentals)
            .where(t.rentals.c.id == rental.id, t.rentals.c.state == rental.state.value)
            .values(**values)
        )
        if done.rowcount != 1:
            raise Stale("rental", rental.id)
        self.tx.journal.write(
            "rental", rental.id, rental.tenant, rental.state.value, target.value, reason
        )
        values.pop("live_name", None)
        for key, value in values.items():
            setattr(rental, key, value)
        rental.state = target

    def events(self, rental_id: str, limit: int = 50) -> builtins.list[JournalRow]:
        """The latest of the rental's journal, newest first."""
        return self.tx.journal.latest("rental", rental_id, limit)


def new_rental_id() -> str:
    return "r-" + secrets.token_hex(6)
