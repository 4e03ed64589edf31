"""The latest result of each check on each node, and the GPU health it implies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, insert, select, update

from gpuprovider.store import schema as t

if TYPE_CHECKING:
    from gpuprovider.store.store import Tx


class CheckRepo:
    def __init__(self, tx: Tx):
        self.tx = tx

    def save(self, node_id: str, results: Sequence[Any], ran_at: float) -> set[str]:
        """Keep each check's latest result. A GPU with any FAIL among its latest results
        is marked failed (no new work), and cleared once none is left. Returns the GPUs
        whose results changed."""
        conn = self.tx.conn
        touched: set[str] = set()
        for result in results:
            row = result.to_dict() | {"node_id": node_id, "key": result.key, "ran_at": ran_at}
            conn.execute(
                t.check_results.delete().where(
                    (t.check_results.c.node_id == node_id) & (t.check_results.c.key == result.key)
                )
            )
            conn.execute(insert(t.check_results).values(**row))
            if result.gpu_uuid:
                touched.add(result.gpu_uuid)
        for uuid in touched:
            self.apply_health(uuid)
        return touched

    def latest(self, node_id: str) -> list[dict[str, Any]]:
        rows = self.tx.conn.execute(
            select(t.check_results)
            .where(t.check_results.c.node_id == node_id)
            .order_by(t.check_results.c.ran_at, t.check_results.c.group, t.check_results.c.key)
        )
        return [dict(row._mapping) for row in rows]

    def last_pass(self) -> dict[str, float]:
        """Per node, when a check last passed there."""
        c = t.check_results.c
        query = select(c.node_id, func.max(c.ran_at)).where(c.status == "PASS").group_by(c.node_id)
        return {node_id: at for node_id, at in self.tx.conn.execute(query)}

    def apply_health(self, uuid: str) -> None:
        """A GPU with a FAIL among its latest check results is `failed`; otherwise `ok`.
        Health set by anything else is left alone."""
        conn = self.tx.conn
        failed = conn.execute(
            select(t.check_results.c.key, t.check_results.c.advice)
            .where(t.check_results.c.gpu_uuid == uuid)
            .where(t.check_results.c.status == "FAIL")
            .order_by(t.check_results.c.key)
        ).all()
        reason = "; ".join(f"{r.key}: {r.advice}" if r.advice else r.key for r in failed)
        conn.execute(
            update(t.gpus)
            .where(t.gpus.c.uuid == uuid)
            .where(t.gpus.c.health.in_(("ok", "failed")))
            .values(
                health="failed" if failed else "ok",
                health_reason=f"last check FAILed: {reason}" if failed else "",
            )
        )
