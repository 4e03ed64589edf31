"""Services: replica sets behind the gateway, and their events."""

from __future__ import annotations

import secrets
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select, update

from gpuprovider.domain.records import ServiceRecord
from gpuprovider.domain.spec import TaskSpec
from gpuprovider.store import schema as t
from gpuprovider.store.rows import record

if TYPE_CHECKING:
    from gpuprovider.store.store import Tx

_COLUMNS = [t.services.c[f.name] for f in fields(ServiceRecord)]


class ServiceRepo:
    def __init__(self, tx: Tx):
        self.tx = tx

    def insert(self, name: str, tenant: str, spec: TaskSpec, replicas: int) -> ServiceRecord:
        """IntegrityError when a live service has the name."""
        values = dict(
            id="s-" + secrets.token_hex(6),
            name=name,
            live_name=name,
            tenant=tenant,
            spec=spec.model_dump(mode="json", exclude_defaults=True),
            replicas=replicas,
            next_replica=0,
            state="live",
            created_at=self.tx.now,
            updated_at=self.tx.now,
        )
        self.tx.conn.execute(insert(t.services).values(**values))
        values.pop("live_name")
        return ServiceRecord(**values)

    def get(self, ref: str, tenant: str | None = None) -> ServiceRecord | None:
        """A service by id, else the live one of that name (else the latest of it)."""
        c = t.services.c
        query = select(*_COLUMNS).where((c.id == ref) | (c.name == ref))
        if tenant is not None:
            query = query.where(c.tenant == tenant)
        query = query.order_by(
            (c.id == ref).desc(), (c.state == "live").desc(), c.created_at.desc()
        )
        row = self.tx.conn.execute(query.limit(1)).first()
        return record(ServiceRecord, row) if row else None

    def live_named(self, name: str) -> ServiceRecord | None:
        row = self.tx.conn.execute(select(*_COLUMNS).where(t.services.c.live_name == name)).first()
        return record(ServiceRecord, row) if row else None

    def list(self, tenant: str | None = None, live: bool = True) -> list[ServiceRecord]:
        c = t.services.c
        query = select(*_COLUMNS).order_by(c.name)
        if tenant is not None:
            query = query.where(c.tenant == tenant)
        if live:
            query = query.where(c.state == "live")
        return [record(ServiceRecord, r) for r in self.tx.conn.execute(query)]

    def update(self, service: ServiceRecord, **changes: Any) -> None:
        if changes.get("state") == "stopped":
            changes["live_name"] = None
        self.tx.conn.execute(
            update(t.services)
            .where(t.services.c.id == service.id)
            .values(updated_at=self.tx.now, **changes)
        )
        changes.pop("live_name", None)
        for key, value in changes.items():
            setattr(service, key, value)

    def event(self, service_id: str, reason: str) -> None:
        self.tx.conn.execute(
            insert(t.service_events).values(service_id=service_id, at=self.tx.now, reason=reason)
        )

    def events(self, service_id: str, limit: int = 50) -> list[dict[str, Any]]:
        c = t.service_events.c
        rows = self.tx.conn.execute(
            select(c.at, c.reason)
            .where(c.service_id == service_id)
            .order_by(c.id.desc())
            .limit(limit)
        )
        return [{"at": r.at, "reason": r.reason} for r in rows]
