"""The journal as one feed for every client: a page of rows after a cursor, and a live
stream that resumes from one.

Whoever follows (the CLI's `events --follow`, the dashboard, a client) reads the rows
after its cursor from the store once, then hears of new ones from the `Feed`: one
thread reads each batch of new rows once, after each commit that wrote some (the
store's JOURNAL signal), and hands each follower the rows it may see. A follower that
does not keep up is dropped (its stream says so: it resumes from its cursor), so a
client that never reads holds a bounded buffer, never the daemon's memory or loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from gpuprovider.domain.records import JournalRow, TokenRecord
from gpuprovider.service.errors import ServiceError
from gpuprovider.store.store import Store

log = logging.getLogger(__name__)

PAGE_MAX = 1000
FOLLOWER_BUFFER = 2000  # rows a follower may have unread before it is dropped
RESYNC_S = 1.0  # the feed also looks on a timer: another daemon may share the store
KINDS = frozenset({"task", "node", "service", "lease", "pipeline", "stage", "rental"})


class BadCursor(ServiceError):
    status = 400


@dataclass(frozen=True)
class Scope:
    """What one reader may see and asked for: its tenant's rows (an admin: every row,
    or one tenant's), of some kinds, of one subject."""

    tenant: str | None  # None: every tenant's and the provider's own (admins)
    kinds: tuple[str, ...] = ()
    subject: str | None = None

    def admits(self, row: JournalRow) -> bool:
        return (
            (self.tenant is None or row.tenant == self.tenant)
            and (not self.kinds or row.kind in self.kinds)
            and (self.subject is None or row.subject == self.subject)
        )


def scope_for(
    who: TokenRecord, kinds: Sequence[str], subject: str | None, tenant: str | None
) -> Scope:
    """The scope `who` reads in: a tenant sees only its own rows whatever it asks; an
    admin may narrow to a tenant ("" for the provider's own: nodes)."""
    unknown = sorted(set(kinds) - KINDS)
    if unknown:
        raise BadCursor(f"kind: {', '.join(unknown)} unknown; known: {', '.join(sorted(KINDS))}")
    if who.is_admin:
        return Scope(tenant, tuple(kinds), subject or None)
    return Scope(who.tenant, tuple(kinds), subject or None)


def parse_cursor(text: str | None, newest: int) -> int:
    """A cursor as given (a row's id; "" or None: the start; "now": the newest row), or
    BadCursor naming it: malformed, or from the future (past the newest row)."""
    if text is None or text == "":
        return 0
    if text == "now":
        return newest
    if not text.isdigit() or len(text) > 18:
        raise BadCursor(f"cursor {text[:40]!r} is not one this provider gave (a row's number)")
    cursor = int(text)
    if cursor > newest:
        raise BadCursor(
            f"cursor {cursor} is from the future: the journal ends at {newest} "
            "(a cursor of another provider, or of a store that was replaced?)"
        )
    return cursor


@dataclass(eq=False)
class Follower:
    """One live reader: rows it may see, handed over on its own event loop."""

    scope: Scope
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[list[JournalRow] | None] = field(default_factory=asyncio.Queue)
    pending: int = 0  # rows handed over and not yet read
    dropped: bool = False

    def offer(self, rows: list[JournalRow]) -> None:
        """Called on the feed's thread: the rows this follower may see go to its loop."""
        mine = [row for row in rows if self.scope.admits(row)]
        if mine and not self.dropped:
            self.loop.call_soon_threadsafe(self._put, mine)

    def _put(self, rows: list[JournalRow]) -> None:
        if self.dropped:
            return
        if self.pending + len(rows) > FOLLOWER_BUFFER:  # it does not keep up: dropped
            self.dropped = True
            self.queue.put_nowait(None)
            return
        self.pending += len(rows)
        self.queue.put_nowait(rows)

    async def next(self) -> list[JournalRow] | None:
        """The next rows, or None once dropped."""
        rows = await self.queue.get()
        if rows is not None:
            self.pending -= len(rows)
        return rows


class Journal:
    """Pages of the journal for API callers, and the live feed."""

    def __init__(self, store: Store):
        self.store = store
        self._followers: set[Follower] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        with store.read() as r:
            self.seen = r.journal.last_id()

    # -- pages ----------------------------------------------------------------------

    def newest(self) -> int:
        with self.store.read() as r:
            return r.journal.last_id()

    def page(
        self,
        who: TokenRecord,
        kinds: Sequence[str] = (),
        subject: str | None = None,
        tenant: str | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> dict[str, object]:
        """Rows after the cursor `after` that `who` may see, oldest first, and the cursor
        to ask from next."""
        scope = scope_for(who, kinds, subject, tenant)
        with self.store.read() as r:
            cursor = parse_cursor(after, r.journal.last_id())
            rows = r.journal.after(
                cursor, min(limit, PAGE_MAX), scope.kinds, scope.subject, scope.tenant
            )
        following = str(rows[-1].id) if rows else str(cursor)
        return {"events": [row.as_dict() for row in rows], "next": following}

    def backlog(self, scope: Scope, cursor: int) -> list[JournalRow]:
        with self.store.read() as r:
            return r.journal.after(cursor, PAGE_MAX, scope.kinds, scope.subject, scope.tenant)

    # -- the live feed --------------------------------------------------------------

    def follow(self, scope: Scope) -> Follower:
        follower = Follower(scope, asyncio.get_running_loop())
        with self._lock:
            self._followers.add(follower)
        return follower

    def unfollow(self, follower: Follower) -> None:
        with self._lock:
            self._followers.discard(follower)

    def followers(self) -> int:
        return len(self._followers)

    def committed(self, _subjects: object = None) -> None:
        """The store committed journal rows (its JOURNAL signal): read them soon."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="journal-feed", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(RESYNC_S)
            self._wake.clear()
            try:
                self.pump()
            except Exception:  # the feed's trouble is logged; followers keep theirs
                log.exception("the journal feed could not read new rows; trying again")

    def pump(self) -> int:
        """Read the rows committed since the last look, once, and hand them out."""
        handed = 0
        while True:
            with self.store.read() as r:
                rows = r.journal.after(self.seen, PAGE_MAX)
            if not rows:
                return handed
            self.seen = rows[-1].id
            with self._lock:
                followers = list(self._followers)
            for follower in followers:
                follower.offer(rows)
            handed += len(rows)
