"""The HTTP API under /api/v1: routers per resource, errors as {"error": ...}."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpuprovider import __version__
from gpuprovider.api.deps import Services
from gpuprovider.api.routers import (
    events,
    files,
    gpus,
    health,
    market,
    nodes,
    pipelines,
    proofs,
    swan,
    tasks,
    tokens,
    watch,
)
from gpuprovider.api.routers import rentals as rental_routes
from gpuprovider.api.routers import services as service_routes
from gpuprovider.api.ui import pages
from gpuprovider.domain.wire import parse_json
from gpuprovider.service.errors import ServiceError

PREFIX = "/api/v1"
UPLOADS = f"{PREFIX}/uploads/"


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _field_errors(exc: RequestValidationError) -> list[str]:
    lines = []
    for item in exc.errors():
        loc = [str(p) for p in item["loc"] if p not in ("body", "query", "path")]
        msg = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown field; check its spelling"
        lines.append(f"{'.'.join(loc) or 'body'}: {msg}")
    return lines


async def _invalid(request: Request, exc: RequestValidationError) -> Response:
    details = _field_errors(exc)
    if pages.is_ui(request.scope):
        return await pages.error_page(request, 422, "; ".join(details))
    return _error(422, "; ".join(details), details=details)


async def _http(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's own refusals (a body it cannot parse, a route that is not there), in the
    API's error shape (the dashboard's: as a page)."""
    message = str(exc.detail)
    if pages.is_ui(request.scope):
        return await pages.error_page(request, exc.status_code, message)
    if exc.status_code == 400 and "parsing the body" in message:
        message = "the body could not be read as JSON: malformed, or nested too deep"
    response = _error(exc.status_code, message)
    response.headers.update(exc.headers or {})
    return response


async def _refused(request: Request, exc: ServiceError) -> Response:
    if pages.is_ui(request.scope):
        return await pages.refused(request, exc)
    response = _error(exc.status, str(exc))
    response.headers.update(exc.headers)
    return response


def create_app(services: Services) -> FastAPI:
    app = FastAPI(
        title="gpuprovider",
        version=__version__,
        openapi_url=f"{PREFIX}/openapi.json",
        docs_url=f"{PREFIX}/docs",
        redoc_url=None,
    )
    app.state.services = services
    # starlette types a handler as taking any Exception, not the class it is added for
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(ServiceError, _refused)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http)  # type: ignore[arg-type]
    for module in (
        health,
        tasks,
        nodes,
        gpus,
        proofs,
        tokens,
        watch,
        service_routes,
        rental_routes,
        market,
        swan,
        events,
        files,
        pipelines,
    ):
        app.include_router(module.router, prefix=PREFIX)
    app.include_router(pipelines.batches, prefix=PREFIX)
    app.include_router(watch.metrics_router)
    pages.install(app)  # the dashboard, under /ui
    return app


SWAN_PATHS = f"{PREFIX}/computing/"  # Swan's orchestrator reads errors in its own shape


def _refused_body(scope: dict, status: int, message: str) -> JSONResponse:
    if scope.get("path", "").startswith(SWAN_PATHS):  # go-computing-provider's 4000 "bad json"
        return JSONResponse(
            {"status": "fail", "code": 4000, "message": message, "error": message}, status
        )
    return _error(status, message)


LOOP_PARSE_BYTES = 64 << 10  # JSON bodies up to this are checked on the loop itself


class BodyLimit:
    """Refuses request bodies over the limit with 413 before they are read whole, and a
    JSON body that nests too deep or holds a number too large (or not finite) with 400
    before anything parses it: nothing of the app sees a body it could choke on."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        json_body = b"json" in headers.get(b"content-type", b"").lower()
        if scope.get("method") == "PUT" and scope["path"].startswith(UPLOADS) and not json_body:
            # an upload streams to disk, held to its Content-Length and the tenant's quota
            return await self.app(scope, receive, send)
        declared = headers.get(b"content-length")
        too_big = _refused_body(
            scope, 413, f"request body is larger than the limit of {self.limit} bytes"
        )
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_big(scope, receive, send)
        if b"json" in headers.get(b"content-type", b"").lower():
            return await self._json(scope, receive, send, too_big)
        seen = 0
        refused = False

        async def limited_receive() -> dict:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                # Answer 413 now; the app sees the client gone and its reply is dropped.
                refused = True
                await too_big(scope, receive, send)
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            if not refused:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)

    async def _json(self, scope: dict, receive: Any, send: Any, too_big: Any) -> None:
        """Read the whole (bounded) JSON body, check it, and hand it on as it came."""
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                return await too_big(scope, receive, send)
            if not message.get("more_body", False):
                break
        if body:
            try:
                # depth and size here; numbers are bounded by the typed models, which
                # name the field. A large body is scanned on a worker thread: about
                # 50 ms of CPU per MiB, which the loop must not spend.
                if len(body) > LOOP_PARSE_BYTES:
                    await asyncio.to_thread(parse_json, bytes(body), self.limit, numbers=False)
                else:
                    parse_json(bytes(body), self.limit, numbers=False)
            except ValueError as exc:
                return await _refused_body(scope, 400, f"body: {exc}")(scope, receive, send)
        given = False

        async def replay() -> dict:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def build_asgi(services: Services, max_body_bytes: int) -> Any:
    return BodyLimit(create_app(services), max_body_bytes)
