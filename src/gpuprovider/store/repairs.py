"""What repair rules did, and booked/idle GPU-seconds."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import func, insert, select, update

from gpuprovider.store import schema as t

if TYPE_CHECKING:
    from gpuprovider.store.store import Tx

DAY_S = 86400


class RepairRepo:
    def __init__(self, tx: Tx):
        self.tx = tx

    def record(
        self,
        node_id: str,
        gpu_uuid: str,
        rule: str,
        signal: str,
        action: str,
        outcome: str,
        detail: str,
        evidence: dict[str, Any],
    ) -> None:
        self.tx.conn.execute(
            insert(t.repair_events).values(
                at=self.tx.now,
                node_id=node_id,
                gpu_uuid=gpu_uuid,
                rule=rule,
                signal=signal,
                action=action,
                outcome=outcome,
                detail=detail,
                evidence=evidence,
            )
        )

    def events(
        self, node_id: str | None = None, gpu_uuid: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The latest first."""
        query = select(t.repair_events).order_by(t.repair_events.c.id.desc()).limit(limit)
        if node_id is not None:
            query = query.where(t.repair_events.c.node_id == node_id)
        if gpu_uuid is not None:
            query = query.where(t.repair_events.c.gpu_uuid == gpu_uuid)
        return [dict(row._mapping) for row in self.tx.conn.execute(query)]

    def counts(self) -> list[tuple[str, str, str, int]]:
        """(rule, action, outcome, how many) over the store's life."""
        c = t.repair_events.c
        query = select(c.rule, c.action, c.outcome, func.count()).group_by(
            c.rule, c.action, c.outcome
        )
        return [tuple(row) for row in self.tx.conn.execute(query)]

    def add_usage(self, at: float, booked: dict[tuple[str, str], tuple[float, float]]) -> None:
        """Add (booked, idle) GPU-seconds per (tenant, model) to `at`'s day."""
        day = int(at // DAY_S)
        c, conn = t.gpu_usage.c, self.tx.conn
        for (tenant, model), (booked_s, idle_s) in booked.items():
            where = (c.day == day) & (c.tenant == tenant) & (c.model == model)
            changed = conn.execute(
                update(t.gpu_usage)
                .where(where)
                .values(booked_s=c.booked_s + booked_s, idle_s=c.idle_s + idle_s)
            ).rowcount
            if not changed:
                conn.execute(
                    insert(t.gpu_usage).values(
                        day=day, tenant=tenant, model=model, booked_s=booked_s, idle_s=idle_s
                    )
                )

    def usage(self, since: float | None = None) -> list[tuple[str, str, float, float]]:
        """(tenant, model, booked_s, idle_s) summed over the days from `since` on (all
        days when None)."""
        c = t.gpu_usage.c
        query = select(c.tenant, c.model, func.sum(c.booked_s), func.sum(c.idle_s)).group_by(
            c.tenant, c.model
        )
        if since is not None:
            query = query.where(c.day >= int(since // DAY_S))
        return [tuple(row) for row in self.tx.conn.execute(query)]
