"""API tokens: who calls (with a short cache), minting, listing, revoking."""

from __future__ import annotations

import re
import time
from typing import Any

from sqlalchemy.exc import IntegrityError

from gpuprovider.domain.records import TokenRecord
from gpuprovider.identity.keys import hash_token, new_token
from gpuprovider.service.errors import Conflict, Forbidden, NotFound, Rejected, Unauthenticated
from gpuprovider.service.views import token_view
from gpuprovider.store.store import Store

SCOPES = ("read", "submit", "admin", "verify", "metrics", "gateway")
# `service:<name>`: a token that may call that one service at the gateway, nothing else.
SERVICE_SCOPE = re.compile(r"^service:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


class TokenService:
    # Every request carries a token: lookups are remembered this long. A revocation acts
    # at once in this daemon (its entry is dropped) and within this long anywhere else
    # that shares the store; an expiry acts at once.
    CACHE_TTL_S = 5.0

    def __init__(self, store: Store):
        self.store = store
        self._seen: dict[str, tuple[float, TokenRecord]] = {}

    @staticmethod
    def _hash(authorization: str | None) -> str:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthenticated("missing bearer token: send 'Authorization: Bearer <token>'")
        return hash_token(authorization[7:].strip())

    def cached(self, authorization: str | None) -> TokenRecord | None:
        """The caller, if its token was looked up less than CACHE_TTL_S ago."""
        hit = self._seen.get(self._hash(authorization))
        if hit and time.monotonic() - hit[0] < self.CACHE_TTL_S and hit[1].valid_at(time.time()):
            return hit[1]
        return None

    def authenticate(self, authorization: str | None) -> TokenRecord:
        """The caller of a request, from its Authorization header."""
        token_hash = self._hash(authorization)
        now = time.monotonic()
        with self.store.read() as r:
            found = r.tokens.by_hash(token_hash)
        if found is None:
            raise Unauthenticated("unknown token")
        if found.revoked_at is not None:
            raise Unauthenticated(f"token {found.name!r} was revoked")
        if not found.valid_at(time.time()):
            raise Unauthenticated(f"token {found.name!r} has expired")
        if len(self._seen) > 10_000:
            self._seen.clear()
        self._seen[token_hash] = (now, found)
        return found

    @staticmethod
    def require(who: TokenRecord, scope: str) -> TokenRecord:
        if not who.allows(scope):
            raise Forbidden(f"token {who.name!r} lacks the {scope!r} scope")
        return who

    def create(
        self, name: str, scopes: list[str], tenant: str | None, expires_in_s: float | None = None
    ) -> dict[str, Any]:
        """A new token, shown once: only its hash is stored."""
        unknown = sorted(s for s in set(scopes) - set(SCOPES) if not SERVICE_SCOPE.match(s))
        if unknown:
            raise Rejected(
                f"scopes: unknown {unknown}; choose from {list(SCOPES)} or service:<name>"
            )
        secret = new_token()
        try:
            with self.store.tx() as tx:
                expires_at = tx.now + expires_in_s if expires_in_s else None
                made = tx.tokens.add(name, hash_token(secret), scopes, tenant or name, expires_at)
        except IntegrityError:
            raise Conflict(
                f"a token named {name!r} exists already (revoked ones keep their names); "
                "choose another name (--tenant keeps the tenant)"
            ) from None
        return token_view(made) | {"token": secret}

    def revoke(self, name: str) -> dict[str, Any]:
        """Refuse the token from now on (its record stays: who had access, until when)."""
        with self.store.tx() as tx:
            token = tx.tokens.named(name)
            if token is None:
                raise NotFound(f"no token named {name!r}")
            if token.revoked_at is None:
                others = [
                    t
                    for t in tx.tokens.all()
                    if t.is_admin and t.valid_at(tx.now) and t.id != token.id
                ]
                if token.is_admin and token.valid_at(tx.now) and not others:
                    raise Conflict(
                        f"token {name!r} is the last admin token: revoking it would lock "
                        "every operator out; create another admin token first"
                    )
                tx.tokens.revoke(token.id)
            token = tx.tokens.named(name)
            assert token is not None  # revoked, never deleted
        for token_hash, (_, seen) in list(self._seen.items()):
            if seen.id == token.id:
                self._seen.pop(token_hash, None)
        return token_view(token)

    def list(self) -> list[dict[str, Any]]:
        with self.store.read() as r:
            return [token_view(t) for t in r.tokens.all()]
