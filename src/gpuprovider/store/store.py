"""The store: one engine, and transactions that carry a repository per aggregate.

Every read and write goes through a `Tx`: `store.tx()` for a transaction that writes
(committed on leaving the block, then its signals are published), `store.read()` for
reads. Repositories (`tx.tasks`, `tx.nodes`, `tx.tokens`, `tx.checks`, `tx.proofs`,
`tx.repairs`, `tx.services`) all use the transaction's one connection, so a service
can store a check result and make a transition atomically.

Threads: the engine is shared by every thread of the daemon (the API's worker threads
and each loop's thread). A transaction is used by the thread that opened it only;
each checks out its own connection from the engine's pool. On SQLite (WAL: readers
never wait for the writer) the daemon's writing transactions take turns on a lock of
its own: SQLite has one writer at a time anyway, and its busy handler, which would
otherwise arbitrate, sleeps in steps of milliseconds. Commits write to the WAL without
waiting for the disk; the daemon checkpoints the WAL into the database from a loop
(`checkpoint`), never in a commit, so a commit never waits for the disk either.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, literal, select

from gpuprovider.store.checks import CheckRepo
from gpuprovider.store.journal import JournalRepo
from gpuprovider.store.market import MarketRepo
from gpuprovider.store.nodes import NodeRepo
from gpuprovider.store.pipelines import PipelineRepo
from gpuprovider.store.proofs import ProofRepo
from gpuprovider.store.rentals import RentalRepo
from gpuprovider.store.repairs import RepairRepo
from gpuprovider.store.services import ServiceRepo
from gpuprovider.store.signals import Fired, Signal, Signals
from gpuprovider.store.tasks import TaskRepo
from gpuprovider.store.tokens import TokenRepo

# A child process that upgrades the store may take this long (a large store migrating).
UPGRADE_TIMEOUT_S = 3600.0
_PING = select(literal(1))


class StoreError(RuntimeError):
    """The store cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Upgrade:
    before: str | None  # revision found (None: an empty store)
    after: str

    @property
    def changed(self) -> bool:
        return self.before != self.after


class Tx:
    """One transaction and the repositories that work in it."""

    def __init__(self, conn: Connection, now: float):
        self.conn = conn
        self.now = now
        self.fired: Fired = {}
        self.journaled = False  # whether this transaction wrote to the journal

    def answers(self) -> bool:
        """A read that costs the store nothing: whether it answers at all."""
        return self.conn.execute(_PING).scalar() == 1

    def signal(self, signal: Signal, *subjects: str) -> None:
        """Note what this transaction changed, published once it commits."""
        self.fired.setdefault(signal, set()).update(subjects)

    @cached_property
    def journal(self) -> JournalRepo:
        return JournalRepo(self)

    @cached_property
    def tasks(self) -> TaskRepo:
        return TaskRepo(self)

    @cached_property
    def nodes(self) -> NodeRepo:
        return NodeRepo(self)

    @cached_property
    def tokens(self) -> TokenRepo:
        return TokenRepo(self)

    @cached_property
    def checks(self) -> CheckRepo:
        return CheckRepo(self)

    @cached_property
    def proofs(self) -> ProofRepo:
        return ProofRepo(self)

    @cached_property
    def repairs(self) -> RepairRepo:
        return RepairRepo(self)

    @cached_property
    def services(self) -> ServiceRepo:
        return ServiceRepo(self)

    @cached_property
    def market(self) -> MarketRepo:
        return MarketRepo(self)

    @cached_property
    def pipelines(self) -> PipelineRepo:
        return PipelineRepo(self)

    @cached_property
    def rentals(self) -> RentalRepo:
        return RentalRepo(self)


class Store:
    def __init__(self, url: str, signals: Signals | None = None):
        self.url = url
        self.signals = signals or Signals()
        self.is_sqlite = url.startswith("sqlite")
        connect_args = {"check_same_thread": False} if self.is_sqlite else {}
        self.engine: Engine = create_engine(url, connect_args=connect_args)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._writing = threading.RLock() if self.is_sqlite else contextlib.nullcontext()

    def upgrade_in_child(self) -> Upgrade:
        """`store.migrate.upgrade`, run in a child process: what the daemon does, so that
        Alembic (~10 MB) never stays in its memory."""
        done = subprocess.run(
            [sys.executable, "-m", "gpuprovider.store.migrate", self.url],
            capture_output=True,
            text=True,
            timeout=UPGRADE_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise StoreError(
                done.stderr.strip() or f"upgrading the store failed ({done.returncode})"
            )
        found = json.loads(done.stdout)
        return Upgrade(found["before"], found["after"])

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        with self._writing, self.engine.begin() as conn:
            tx = Tx(conn, time.time())
            yield tx
            if tx.journaled:
                tx.journal.flush()
        if tx.journaled:
            tx.signal(Signal.JOURNAL)
        if tx.fired:
            self.signals.publish(tx.fired)

    @contextmanager
    def writing_at_once(self) -> Iterator[bool]:
        """Hold the turn to write if no one has it now (True), without waiting for it
        (False, and then nothing is held). Only SQLite takes turns."""
        if not self.is_sqlite:
            yield False
            return
        lock = self._writing
        assert not isinstance(lock, contextlib.nullcontext)  # SQLite's is an RLock
        held = lock.acquire(blocking=False)
        try:
            yield held
        finally:
            if held:
                lock.release()

    def checkpoint(self) -> None:
        """Move what the WAL holds into the database file (SQLite; nothing elsewhere)."""
        if self.is_sqlite:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")

    @contextmanager
    def read(self) -> Iterator[Tx]:
        with self.engine.connect() as conn:
            yield Tx(conn, time.time())

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA wal_autocheckpoint=0")  # the daemon checkpoints (Store.checkpoint)
    cursor.close()
