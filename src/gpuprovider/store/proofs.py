"""The latest proof-of-GPU verdict per GPU, as a trusted verifier signed it, and every
challenge id the provider has taken (none is taken twice)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

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
                at=float(verdict["at"]),  # signed by the verifier: a proof's age starts there
                verifier_key=verdict["verifier_key"],
                model=verdict["model"],
                simulated=verdict["simulated"],
                covered_bytes=verdict["covered_bytes"],
                timed=verdict["timed"],
                signed={"verdict": verdict, "signature": signature},
                protocol=str(verdict["protocol"]),
            )
        )

    def take_challenge(self, challenge_id: str, gpu_uuid: str) -> bool:
        """Record a challenge id as used; False when it was already (on any GPU)."""
        exists = self.tx.conn.execute(
            select(t.proof_challenges.c.challenge_id).where(
                t.proof_challenges.c.challenge_id == challenge_id
            )
        ).first()
        if exists:
            return False
        try:
            with self.tx.conn.begin_nested():
                self.tx.conn.execute(
                    insert(t.proof_challenges).values(
                        challenge_id=challenge_id, gpu_uuid=gpu_uuid, seen_at=self.tx.now
                    )
                )
        except IntegrityError:  # taken by a concurrent request between the two statements
            return False
        return True

    def get(self, gpu_uuid: str) -> dict[str, Any] | None:
        row = self.tx.conn.execute(
            select(t.gpu_proofs).where(t.gpu_proofs.c.gpu_uuid == gpu_uuid)
        ).first()
        return dict(row._mapping) if row else None
