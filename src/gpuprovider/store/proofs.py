"""The latest proof-of-GPU verdict per GPU, as a trusted verifier signed it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select

from gpuprovider.store import schema as t

if TYPE_CHECKING:
    from gpuprovider.store.store import Tx


class ProofRepo:
    def __init__(self, tx: Tx):
        self.tx = tx

    def save(
        self, gpu_uuid: str, node_id: str, verdict: dict[str, Any], signature: str, poster: str
    ) -> None:
        """Keep this signed verdict (checked by the caller) as the GPU's latest."""
        conn = self.tx.conn
        conn.execute(t.gpu_proofs.delete().where(t.gpu_proofs.c.gpu_uuid == gpu_uuid))
        conn.execute(
            insert(t.gpu_proofs).values(
                gpu_uuid=gpu_uuid,
                node_id=node_id,
                challenge_id=verdict["challenge_id"],
                passed=verdict["passed"],
                reason=verdict["reason"],
                figures=verdict["figures"],
                verifier=poster,
                at=self.tx.now,
                verifier_key=verdict["verifier_key"],
                model=verdict["model"],
                simulated=verdict["simulated"],
                covered_bytes=verdict["covered_bytes"],
                timed=verdict["timed"],
                signed={"verdict": verdict, "signature": signature},
            )
        )

    def get(self, gpu_uuid: str) -> dict[str, Any] | None:
        row = self.tx.conn.execute(
            select(t.gpu_proofs).where(t.gpu_proofs.c.gpu_uuid == gpu_uuid)
        ).first()
        return dict(row._mapping) if row else None
