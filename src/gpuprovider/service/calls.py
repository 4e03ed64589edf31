"""Where a service call runs when the event loop that serves the API asks for it: never
on that loop if it could wait.

A read of a SQLite store runs on the loop: in WAL mode a reader waits for no one, and
the hop to a thread would cost more than the read. A write runs on the loop only when
the store's turn to write is free at once (commits do not wait for the disk); else it
waits its turn on a worker thread. A call that asks a node or computes at length always
runs on a thread. On PostgreSQL every store call is a network round trip: all go to
threads."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from gpuprovider.store.store import Store

P = ParamSpec("P")
T = TypeVar("T")


class Calls:
    def __init__(self, store: Store):
        self.store = store
        self.reads_wait = not store.is_sqlite

    async def read(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """A call that only reads the store."""
        if self.reads_wait:
            return await asyncio.to_thread(call, *args, **kwargs)
        return call(*args, **kwargs)

    async def write(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """A call that writes to the store (and may read it)."""
        with self.store.writing_at_once() as held:
            if held:
                return call(*args, **kwargs)
        return await asyncio.to_thread(call, *args, **kwargs)

    async def slow(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """A call that asks a node or computes at length: always on a worker thread."""
        return await asyncio.to_thread(call, *args, **kwargs)
