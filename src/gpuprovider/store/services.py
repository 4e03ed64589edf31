"""Services: replica sets behind the gateway. Their history is in the journal."""

from __future__ import annotations

import builtins
import secrets
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select, update

from gpuprovider.domain.records import JournalRow, OwnerKind, ServiceRecord
from gpuprovider.domain.services import ACTIVE, ServiceState
from gpuprovider.domain.spec import TaskSpec
from gpuprovider.lifecycle.kernel import Stale
from gpuprovider.store import schema as t
from gpuprovider.store.rows import record

if TYPE_CHECKING:
    from gpuprovider.store.store import Tx

_COLUMNS = [t.services.c[f.name] for f in fields(ServiceRecord)]
_ACTIVE = [s.value for s in ACTIVE]


def _service(row: Any) -> ServiceRecord:
    service = record(ServiceRecord, row)
    service.state = ServiceState(service.state)
    service.draining = dict(service.draining or {})
    return service


class ServiceRepo:
    def __init__(self, tx: Tx):
        self.tx = tx

    def insert(
        self,
        name: str,
        tenant: str,
        spec: TaskSpec,
        replicas: int,
        owner: tuple[OwnerKind, str] | None = None,
    ) -> ServiceRecord:
        """A new service, starting, with its journal row. IntegrityError when an active
        service has the name."""
        values: dict[str, Any] = dict(
            id="s-" + secrets.token_hex(6),
            name=name,
            live_name=name,
            tenant=tenant,
            spec=spec.model_dump(mode="json", exclude_defaults=True),
            replicas=replicas,
            next_replica=0,
            state=ServiceState.STARTING.value,
            created_at=self.tx.now,
            updated_at=self.tx.now,
            owner_kind=owner[0].value if owner else None,
            owner_id=owner[1] if owner else None,
            draining={},
        )
        self.tx.conn.execute(insert(t.services).values(**values))
        values.pop("live_name")
        service = ServiceRecord(**values)
        service.state = ServiceState.STARTING
        self.tx.journal.write(
            "service", service.id, tenant, None, service.state.value, f"started by {tenant}"
        )
        return service

    def get(self, ref: str, tenant: str | None = None) -> ServiceRecord | None:
        """A service by id, else the active one of that name (else the latest of it)."""
        c = t.services.c
        query = select(*_COLUMNS).where((c.id == ref) | (c.name == ref))
        if tenant is not None:
            query = query.where(c.tenant == tenant)
        query = query.order_by(
            (c.id == ref).desc(), c.state.in_(_ACTIVE).desc(), c.created_at.desc()
        )
        row = self.tx.conn.execute(query.limit(1)).first()
        return _service(row) if row else None

    def live_named(self, name: str) -> ServiceRecord | None:
        row = self.tx.conn.execute(select(*_COLUMNS).where(t.services.c.live_name == name)).first()
        return _service(row) if row else None

    def list(self, tenant: str | None = None, active: bool = True) -> list[ServiceRecord]:
        c = t.services.c
        query = select(*_COLUMNS).order_by(c.name)
        if tenant is not None:
            query = query.where(c.tenant == tenant)
        if active:
            query = query.where(c.state.in_(_ACTIVE))
        return [_service(r) for r in self.tx.conn.execute(query)]

    def draining_any(self) -> builtins.list[ServiceRecord]:
        """Services with replicas being drained (the service loop finishes them)."""
        return [s for s in self.list() if s.draining]

    def update(self, service: ServiceRecord, **changes: Any) -> None:
        """Change fields other than the state (the lifecycle changes that)."""
        self.tx.conn.execute(
            update(t.services)
            .where(t.services.c.id == service.id)
            .values(updated_at=self.tx.now, **changes)
        )
        for key, value in changes.items():
            setattr(service, key, value)

    def write_transition(
        self, service: ServiceRecord, target: ServiceState, reason: str, changes: dict[str, Any]
    ) -> None:
        """Store a state change guarded by the state read, with its journal row."""
        values = dict(changes, state=target.value, updated_at=self.tx.now)
        if target not in ACTIVE:
            values["live_name"] = None
        done = self.tx.conn.execute(
            update(t.services)
            .where(t.services.c.id == service.id, t.services.c.state == service.state.value)
            .values(**values)
        )
        if done.rowcount != 1:
            raise Stale("service", service.id)
        self.tx.journal.write(
            "service", service.id, service.tenant, service.state.value, target.value, reason
        )
        values.pop("live_name", None)
        for key, value in values.items():
            setattr(service, key, value)
        service.state = target

    def note(self, service: ServiceRecord, reason: str) -> None:
        """A decision that left the service's state as it was (scaling, a replacement)."""
        state = service.state.value
        self.tx.journal.write("service", service.id, service.tenant, state, state, reason)

    def events(self, service_id: str, limit: int = 50) -> builtins.list[JournalRow]:
        """The latest of the service's journal, newest first."""
        return self.tx.journal.latest("service", service_id, limit)
