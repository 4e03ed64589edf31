"""API tokens (their hashes; the secrets are never stored)."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from sqlalchemy import insert, select, update

from gpuprovider.domain.records import TokenRecord
from gpuprovider.store import schema as t
from gpuprovider.store.rows import record

if TYPE_CHECKING:
    from gpuprovider.store.store import Tx


class TokenRepo:
    def __init__(self, tx: Tx):
        self.tx = tx

    def add(
        self,
        name: str,
        token_hash: str,
        scopes: list[str],
        tenant: str,
        expires_at: float | None = None,
    ) -> TokenRecord:
        """A new token; IntegrityError (at commit or here) when the name is taken."""
        made = TokenRecord(
            id="k-" + secrets.token_hex(6),
            name=name,
            scopes=scopes,
            tenant=tenant,
            created_at=self.tx.now,
            expires_at=expires_at,
        )
        self.tx.conn.execute(
            insert(t.tokens).values(
                id=made.id,
                name=name,
                token_hash=token_hash,
                scopes=scopes,
                tenant=tenant,
                created_at=made.created_at,
                expires_at=expires_at,
            )
        )
        return made

    def by_hash(self, token_hash: str) -> TokenRecord | None:
        row = self.tx.conn.execute(
            select(t.tokens).where(t.tokens.c.token_hash == token_hash)
        ).first()
        return record(TokenRecord, row) if row else None

    def named(self, name: str) -> TokenRecord | None:
        row = self.tx.conn.execute(select(t.tokens).where(t.tokens.c.name == name)).first()
        return record(TokenRecord, row) if row else None

    def revoke(self, token_id: str) -> None:
        self.tx.conn.execute(
            update(t.tokens)
            .where(t.tokens.c.id == token_id, t.tokens.c.revoked_at.is_(None))
            .values(revoked_at=self.tx.now)
        )

    def callers(self, now: float) -> list[tuple[str, str]]:
        """(hash, whom it may call) of every token valid at `now` that may call services:
        "*" (admin: any), a tenant (scope read or submit: that tenant's), or
        "service:<name>:<tenant>" (that one service, while that tenant's)."""
        rows = self.tx.conn.execute(
            select(t.tokens.c.token_hash, t.tokens.c.tenant, t.tokens.c.scopes).where(
                t.tokens.c.revoked_at.is_(None),
                (t.tokens.c.expires_at.is_(None)) | (t.tokens.c.expires_at > now),
            )
        )
        found = []
        for row in rows:
            if "admin" in row.scopes:
                found.append((row.token_hash, "*"))
                continue
            if {"read", "submit"} & set(row.scopes):
                found.append((row.token_hash, row.tenant))
            # bound to the tenant too: a name another tenant takes later is not reachable
            found += [
                (row.token_hash, f"{s}:{row.tenant}")
                for s in row.scopes
                if s.startswith("service:")
            ]
        return found

    def all(self) -> list[TokenRecord]:
        rows = self.tx.conn.execute(select(t.tokens).order_by(t.tokens.c.created_at))
        return [record(TokenRecord, r) for r in rows]
