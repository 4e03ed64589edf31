"""The hub's HTTP API (`gpuprovider hub serve`). Every call from a provider or a tenant
is a signed request (identity/signing.py); the hub's operator uses a bearer token.
Providers read their events as server-sent events, resuming from `Last-Event-ID`."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from gpuprovider.domain.wire import parse_json
from gpuprovider.hub.hub import BadRequest, Hub, HubError, NotAllowed
from gpuprovider.hub.records import ParticipantKind
from gpuprovider.identity.keys import public_key_hex
from gpuprovider.identity.signing import BadSignature, ReplayCache, verify_request

log = logging.getLogger(__name__)

TICK_S = 0.1
MAX_BODY = 1 << 20


class TooLarge(HubError):
    status = 413


async def read_body(request: Request) -> tuple[bytes, Any]:
    """The body, and what it says as JSON (None when empty), within the limits on size,
    nesting and numbers: refused (413, 400) before anything else reads it, whoever
    sent it, signed or not."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise TooLarge(f"body over {MAX_BODY} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise TooLarge(f"body over {MAX_BODY} bytes")
    if not body:
        return b"", None
    try:
        return bytes(body), parse_json(bytes(body), MAX_BODY)
    except ValueError as exc:
        raise BadRequest(f"body: {exc}") from None


class Signed:
    """Who signed a request, checked against the replay cache, and its JSON body."""

    def __init__(self, cache: ReplayCache):
        self.cache = cache

    async def __call__(self, request: Request) -> tuple[str, Any]:
        body, data = await read_body(request)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        try:
            key = verify_request(dict(request.headers), request.method, target, body, self.cache)
        except BadSignature as exc:
            raise NotAllowed(str(exc)) from None
        return key, data


def create_app(hub: Hub, admin_token: str, cache: ReplayCache | None = None) -> FastAPI:
    cache = cache or ReplayCache()
    signed = Signed(cache)
    admissions: dict[str, asyncio.Task] = {}  # provider key -> its proof in flight

    def admit_soon(key: str) -> None:
        if key in admissions:
            return
        task = asyncio.create_task(asyncio.to_thread(hub.admit, key))
        admissions[key] = task
        task.add_done_callback(lambda _task: admissions.pop(key, None))

    async def loop() -> None:
        while True:
            try:
                await asyncio.to_thread(hub.tick)
                for key in await asyncio.to_thread(hub.due_for_proof, time.time(), TICK_S):
                    admit_soon(key)
            except Exception:  # one bad tick never stops the hub
                log.exception("hub tick failed")
            await asyncio.sleep(TICK_S)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(hub.started)
        ticking = asyncio.create_task(loop())
        yield
        ticking.cancel()
        for task in list(admissions.values()):
            task.cancel()

    app = FastAPI(title="gpuprovider hub", lifespan=lifespan)
    app.state.cache = cache

    @app.exception_handler(HubError)
    async def _hub_error(_request: Request, exc: HubError) -> JSONResponse:
        return JSONResponse({"error": str(exc), **exc.details}, status_code=exc.status)

    def admin(request: Request) -> None:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), admin_token.encode()):
            raise NotAllowed("the hub's admin token is required")

    @app.get("/v1/info")
    def info() -> dict[str, Any]:
        return {
            "verifier_key": public_key_hex(hub.verifier_key),
            "auction_window_s": hub.settings.auction_window_s,
            "heartbeat_s": hub.settings.heartbeat_s,
        }

    @app.post("/v1/providers")
    async def register_provider(request: Request) -> dict[str, Any]:
        key, data = await signed(request)
        made = await asyncio.to_thread(hub.register, key, ParticipantKind.PROVIDER, data)
        admit_soon(key)
        return made

    @app.post("/v1/providers/heartbeat")
    async def heartbeat(request: Request) -> dict[str, Any]:
        key, _ = await signed(request)
        return await asyncio.to_thread(hub.heartbeat, key)

    @app.post("/v1/tenants")
    async def register_tenant(request: Request) -> dict[str, Any]:
        key, data = await signed(request)
        return await asyncio.to_thread(hub.register, key, ParticipantKind.TENANT, data)

    @app.get("/v1/me")
    async def me(request: Request) -> dict[str, Any]:
        key, _ = await signed(request)
        return await asyncio.to_thread(hub.describe, key)

    @app.post("/v1/admin/deposit")
    async def deposit(request: Request) -> dict[str, Any]:
        _, data = await read_body(request)
        admin(request)
        return await asyncio.to_thread(hub.deposit, data)

    @app.get("/v1/admin/ledger")
    def ledger(request: Request) -> dict[str, Any]:
        admin(request)
        return hub.ledger_summary()

    @app.post("/v1/orders")
    async def post_order(request: Request) -> dict[str, Any]:
        key, data = await signed(request)
        return await asyncio.to_thread(hub.post_order, key, data)

    @app.get("/v1/orders")
    async def orders(request: Request) -> list[dict[str, Any]]:
        key, _ = await signed(request)
        return await asyncio.to_thread(hub.orders_of, key)

    @app.post("/v1/orders/{order_id}/bids")
    async def bid(order_id: str, request: Request) -> dict[str, Any]:
        key, data = await signed(request)
        return await asyncio.to_thread(hub.bid, key, order_id, data)

    @app.post("/v1/orders/{order_id}/dispatch")
    async def dispatch(order_id: str, request: Request) -> dict[str, Any]:
        key, data = await signed(request)
        return await asyncio.to_thread(hub.answer_dispatch, key, order_id, data)

    @app.get("/v1/leases")
    async def leases(request: Request) -> list[dict[str, Any]]:
        key, _ = await signed(request)
        return await asyncio.to_thread(hub.leases_of, key)

    @app.post("/v1/leases/{lease_id}/state")
    async def lease_state(lease_id: str, request: Request) -> dict[str, Any]:
        key, data = await signed(request)
        return await asyncio.to_thread(hub.lease_state, key, lease_id, data)

    @app.post("/v1/leases/{lease_id}/close")
    async def close(lease_id: str, request: Request) -> dict[str, Any]:
        key, _ = await signed(request)
        return await asyncio.to_thread(hub.close_lease, key, lease_id)

    @app.get("/v1/history/{subject}")
    async def history(subject: str, request: Request) -> dict[str, Any]:
        """An order's and its lease's journal, with the lease's close and log tail."""
        key, _ = await signed(request)
        return await asyncio.to_thread(hub.history, key, subject)

    @app.post("/v1/leases/{lease_id}/usage")
    async def usage(lease_id: str, request: Request) -> dict[str, Any]:
        key, data = await signed(request)
        return await asyncio.to_thread(hub.record_usage, key, lease_id, data)

    @app.get("/v1/events")
    async def events(request: Request, after: int = 0) -> StreamingResponse:
        """Server-sent events for the signing provider, from `after` (or Last-Event-ID)."""
        key, _ = await signed(request)
        resume = request.headers.get("last-event-id", "")
        start = int(resume) if resume.isdigit() else after
        await asyncio.to_thread(hub.events_after, key, start, 1)  # a provider, or 403 now

        async def stream() -> AsyncIterator[bytes]:
            seen = start
            idle = 0.0
            while not await request.is_disconnected():
                batch = await asyncio.to_thread(hub.events_after, key, seen)
                for event in batch:
                    seen = event["seq"]
                    data = json.dumps(event["data"], separators=(",", ":"))
                    yield f"id: {seen}\nevent: {event['kind']}\ndata: {data}\n\n".encode()
                if batch:
                    idle = 0.0
                    continue
                idle += 0.1
                if idle >= 15:  # a comment keeps proxies from closing a quiet stream
                    idle = 0.0
                    yield b": keep-alive\n\n"
                await asyncio.sleep(0.1)

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app
