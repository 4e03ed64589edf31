"""A server-sent-events response that never lets a client hold the daemon: each write
waits for the client at most SEND_TIMEOUT_S (a client that does not read is dropped),
a client that goes away ends the stream at once, and so does the server stopping (the
app's `state.stopping` event: an open dashboard never holds up `gpuprovider down`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

SEND_TIMEOUT_S = 10.0
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx in front passes events as they come
]


class EventStream(Response):
    """A response streaming what `events` yields (already SSE-formatted text)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], send_timeout_s: float = SEND_TIMEOUT_S):
        super().__init__()
        self.events, self.send_timeout_s = events, send_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()
        # the server stopping ends every stream (what uvicorn does on its own too, as of
        # 0.55; kept so that no server version's shutdown waits on a stream)
        stopping: asyncio.Event | None = getattr(
            getattr(scope.get("app"), "state", None), "stopping", None
        )

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        async def stop() -> None:
            if stopping is not None:
                await stopping.wait()
                gone.set()

        watcher = asyncio.create_task(watch())
        stopper = asyncio.create_task(stop())
        try:
            await self._send(
                send, {"type": "http.response.start", "status": 200, "headers": HEADERS}
            )
            async for text in _until(self.events, gone):
                body = {"type": "http.response.body", "body": text.encode(), "more_body": True}
                if not await self._send(send, body):
                    return  # it does not read: dropped
            await self._send(send, {"type": "http.response.body", "body": b""})
        finally:
            watcher.cancel()
            stopper.cancel()
            with contextlib.suppress(Exception):
                await self.events.aclose()  # type: ignore[attr-defined]

    async def _send(self, send: Send, message: dict[str, Any]) -> bool:
        try:
            await asyncio.wait_for(send(message), self.send_timeout_s)
            return True
        except (TimeoutError, OSError):
            return False


async def _until(events: AsyncIterator[str], gone: asyncio.Event) -> AsyncIterator[str]:
    """`events` until the client has gone."""
    iterator = events.__aiter__()
    while not gone.is_set():
        step = asyncio.ensure_future(iterator.__anext__())
        stop = asyncio.ensure_future(gone.wait())
        done, _ = await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
        if step not in done:
            step.cancel()
            stop.cancel()
            return
        stop.cancel()
        try:
            yield step.result()
        except StopAsyncIteration:
            return
