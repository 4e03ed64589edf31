"""The hub's tables (SQLite by default, PostgreSQL by URL) and the few writes that must
happen together: ledger transfers always post both sides in one transaction."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.schema import DefaultClause

from gpuprovider.market.model import EXTERNAL, Transfer

metadata = MetaData()

# Providers and tenants: who they are is their Ed25519 key.
participants = Table(
    "participants",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("kind", String(16), nullable=False),  # provider, tenant
    Column("name", String(64), nullable=False),
    Column("api_url", String(512), nullable=False, default=""),
    Column("verify_token", Text, nullable=False, default=""),
    Column("gpus", JSON, nullable=False, default=list),  # proven: [{uuid, model}]
    Column("status", String(16), nullable=False),  # pending, admitted, refused, suspended
    Column("status_reason", Text, nullable=False, default=""),
    Column("registered_at", Float, nullable=False),
    Column("last_heartbeat", Float),
    Column("last_proof_at", Float),
    Column("completed", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
)

orders = Table(
    "orders",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(64), nullable=False, index=True),
    Column("spec", JSON, nullable=False),  # the Order
    Column("mode", String(16), nullable=False),  # auction, dispatch
    Column("state", String(16), nullable=False),  # open, matched, unmatched
    Column("deposit", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("decide_at", Float, nullable=False),  # the auction's end, the dispatch's timeout
    Column("dispatched_to", String(64)),
    Column("refused_by", JSON, nullable=False, default=list),
    Column("reason", Text, nullable=False, default=""),
)

bids = Table(
    "bids",
    metadata,
    Column("order_id", String(64), primary_key=True),
    Column("provider", String(64), primary_key=True),
    Column("price_per_hour", BigInteger, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("at", Float, nullable=False),
)

# A matched order's lease has the order's id.
leases = Table(
    "leases",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(64), nullable=False, index=True),
    Column("provider", String(64), nullable=False, index=True),
    Column("state", String(24), nullable=False),
    Column("price_per_hour", BigInteger, nullable=False),
    Column("gpus", Float, nullable=False),
    Column("duration_s", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("running_at", Float),  # billing starts
    Column("billed_s", Float, nullable=False, default=0.0),  # running seconds charged for
    Column("charged", BigInteger, nullable=False, default=0),
    Column("endpoint", String(512), nullable=False, default=""),
    Column("close_reason", String(32), nullable=False, default=""),
    Column("close_detail", Text, nullable=False, default=""),
    Column("closing_at", Float),
    Column("closed_at", Float),
    Column("access_token", Text, nullable=False, default="", server_default=""),
    Column("log_tail", Text, nullable=False, default="", server_default=""),
)

usage = Table(
    "usage",
    metadata,
    Column("lease_id", String(64), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("record", JSON, nullable=False),
    Column("gpu_seconds", Float, nullable=False),
    Column("requests", Integer, nullable=False, default=0, server_default="0"),
    Column("at", Float, nullable=False),
)

ledger = Table(
    "ledger",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("txn", String(64), nullable=False, index=True),
    Column("account", String(160), nullable=False, index=True),
    Column("amount", BigInteger, nullable=False),
    Column("memo", Text, nullable=False, default=""),
    Column("at", Float, nullable=False),
)

# What each provider (or every provider: "*") is told, in order; the stream resumes
# from a sequence number.
events = Table(
    "events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("to", String(64), nullable=False, index=True),
    Column("kind", String(32), nullable=False),
    Column("data", JSON, nullable=False),
    Column("at", Float, nullable=False),
)


# Every transition of the hub's aggregates (participants, orders, leases), one row each,
# and notes of what changed without a change of state (from == to).
journal = Table(
    "journal",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    Column("subject", String(64), nullable=False, index=True),
    Column("tenant", String(64), nullable=False, default=""),  # whose it is (a key)
    Column("at", Float, nullable=False),
    Column("from_state", String(24)),
    Column("to_state", String(24), nullable=False),
    Column("reason", Text, nullable=False),
)


def _add_missing_columns(engine: Engine) -> None:
    """Columns added to a table since a hub made it (the hub has no migrations): each
    has a default, so adding it keeps every row valid."""
    found = inspect(engine)
    with engine.begin() as conn:
        for table in metadata.sorted_tables:
            have = {c["name"] for c in found.get_columns(table.name)}
            for column in table.columns:
                if column.name in have:
                    continue
                kind = column.type.compile(dialect=engine.dialect)
                server_default = column.server_default
                default = server_default.arg if isinstance(server_default, DefaultClause) else None
                clause = f" NOT NULL DEFAULT '{default}'" if default is not None else ""
                conn.execute(
                    text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}{clause}')
                )


class HubStore:
    def __init__(self, url: str):
        self.engine: Engine = create_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":

            @event.listens_for(self.engine, "connect")
            def _sqlite(conn, _record) -> None:  # one writer, readers alongside
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA busy_timeout=10000")

        metadata.create_all(self.engine)
        _add_missing_columns(self.engine)
        self.writing = threading.Lock()

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        """One write transaction at a time: each reads what the last one wrote (pysqlite
        begins a transaction only at its first write, so reads before it would not be
        isolated otherwise), and a rule's read-then-write cannot interleave with another."""
        with self.writing, self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def post(conn: Connection, transfer: Transfer) -> None:
    """Both sides of a transfer, in the caller's transaction."""
    now = time.time()
    conn.execute(
        insert(ledger),
        [
            {
                "txn": p.txn,
                "account": p.account,
                "amount": p.amount,
                "memo": transfer.memo,
                "at": now,
            }
            for p in transfer.postings
        ],
    )


def balance(conn: Connection, account: str) -> int:
    return int(
        conn.execute(
            select(func.coalesce(func.sum(ledger.c.amount), 0)).where(ledger.c.account == account)
        ).scalar_one()
    )


def balances(conn: Connection) -> dict[str, int]:
    rows = conn.execute(
        select(ledger.c.account, func.sum(ledger.c.amount)).group_by(ledger.c.account)
    ).all()
    return {account: int(total) for account, total in rows}


def drift(conn: Connection) -> int:
    """What every account sums to, minus nothing: 0 always (each transfer posts both
    sides). Non-zero means a bug; the figure the bench reports."""
    totals = balances(conn)
    return sum(totals.values())


def deposited(conn: Connection) -> int:
    return -balance(conn, EXTERNAL)


def emit(conn: Connection, to: str, kind: str, data: dict[str, Any]) -> None:
    conn.execute(insert(events).values(to=to, kind=kind, data=data, at=time.time()))


def write_journal(
    conn: Connection,
    kind: str,
    subject: str,
    tenant: str,
    source: str | None,
    target: str,
    reason: str,
) -> None:
    conn.execute(
        insert(journal).values(
            kind=kind,
            subject=subject,
            tenant=tenant,
            at=time.time(),
            from_state=source,
            to_state=target,
            reason=reason[:2000],
        )
    )
