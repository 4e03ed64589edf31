"""The journal: one row per transition of any aggregate, read by cursor.

Rows are appended in the transaction that makes the change, so a row is visible exactly
when the change is. The cursor is the row's id; a reader asks for the rows after the
last id it saw. For that to never skip a row, ids must become visible in order: SQLite
has one writer at a time (the store's lock), and on PostgreSQL a transaction that
writes to the journal first takes a transaction-scoped advisory lock, so journal
writers commit one after another.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, func, insert, select, text

from gpuprovider.domain.records import JournalRow
from gpuprovider.store import schema as t

if TYPE_CHECKING:
    from gpuprovider.store.store import Tx

_INSERT = insert(t.journal)
_LAST = select(func.max(t.journal.c.id))
# any constant: the key of the advisory lock journal writers take on PostgreSQL
_PG_LOCK = text("SELECT pg_advisory_xact_lock(7141590215)")


_COLUMNS = [
    t.journal.c.id,
    t.journal.c.kind,
    t.journal.c.subject,
    t.journal.c.tenant,
    t.journal.c.at,
    t.journal.c.from_state,
    t.journal.c.to_state,
    t.journal.c.reason,
]
_OF_SUBJECT = (
    select(*_COLUMNS)
    .where(t.journal.c.subject == bindparam("subject"), t.journal.c.kind == bindparam("kind"))
    .order_by(t.journal.c.id)
)


class JournalRepo:
    """The journal in one transaction. Rows written are inserted together (one
    statement) before the transaction commits, or before anything reads the journal."""

    def __init__(self, tx: Tx):
        self.tx = tx
        self._locked = False
        self._pending: list[dict[str, object]] = []

    def write(
        self,
        kind: str,
        subject: str,
        tenant: str,
        source: str | None,
        target: str,
        reason: str,
    ) -> None:
        """Append one transition (or, with source == target, a note) to the journal."""
        self._pending.append(
            {
                "kind": kind,
                "subject": subject,
                "tenant": tenant,
                "at": self.tx.now,
                "from_state": source,
                "to_state": target,
                "reason": reason,
            }
        )
        self.tx.journaled = True

    def flush(self) -> None:
        """Insert the rows written so far (the store calls this before committing)."""
        if not self._pending:
            return
        conn = self.tx.conn
        if not self._locked and conn.dialect.name == "postgresql":
            conn.execute(_PG_LOCK)
            self._locked = True
        rows, self._pending = self._pending, []
        conn.execute(_INSERT, rows)

    def of(self, kind: str, subject: str) -> list[JournalRow]:
        """One aggregate's rows, oldest first."""
        self.flush()
        rows = self.tx.conn.execute(_OF_SUBJECT, {"subject": subject, "kind": kind})
        return [JournalRow(*row) for row in rows]

    def latest(self, kind: str, subject: str, limit: int) -> list[JournalRow]:
        """One aggregate's latest `limit` rows, newest first."""
        self.flush()
        query = (
            select(*_COLUMNS)
            .where(t.journal.c.subject == subject, t.journal.c.kind == kind)
            .order_by(t.journal.c.id.desc())
            .limit(limit)
        )
        return [JournalRow(*row) for row in self.tx.conn.execute(query)]

    def after(
        self,
        cursor: int,
        limit: int,
        kinds: Sequence[str] = (),
        subject: str | None = None,
        tenant: str | None = None,
    ) -> list[JournalRow]:
        """Rows after `cursor`, oldest first: of these kinds (all if none), of one
        subject, of one tenant (None: every tenant's and the provider's own)."""
        self.flush()
        c = t.journal.c
        query = select(*_COLUMNS).where(c.id > cursor)
        if kinds:
            query = query.where(c.kind.in_(list(kinds)))
        if subject is not None:
            query = query.where(c.subject == subject)
        if tenant is not None:
            query = query.where(c.tenant == tenant)
        query = query.order_by(c.id).limit(limit)
        return [JournalRow(*row) for row in self.tx.conn.execute(query)]

    def last_id(self) -> int:
        """The cursor of the newest row (0 when the journal is empty)."""
        self.flush()
        return int(self.tx.conn.execute(_LAST).scalar() or 0)

    def counts(self, kind: str) -> dict[str, int]:
        """How many transitions of `kind` entered each state (notes left out)."""
        self.flush()
        c = t.journal.c
        query = (
            select(c.to_state, func.count())
            .where(c.kind == kind, (c.from_state.is_(None)) | (c.from_state != c.to_state))
            .group_by(c.to_state)
        )
        return {state: n for state, n in self.tx.conn.execute(query)}

    def reasons(self, kind: str, state: str) -> dict[str, int]:
        """How many times aggregates of `kind` entered `state`, by reason as written."""
        self.flush()
        c = t.journal.c
        query = (
            select(c.reason, func.count())
            .where(c.kind == kind, c.to_state == state, c.from_state != c.to_state)
            .group_by(c.reason)
        )
        return {reason: n for reason, n in self.tx.conn.execute(query)}
