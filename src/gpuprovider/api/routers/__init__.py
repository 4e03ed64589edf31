"""One router per resource: parse, authorise, call a service, answer."""

import json
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse, Response

from gpuprovider.api.schemas import ErrorOut

# Every route can answer these, each with {"error": "..."}.
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (401, 403, 404, 409, 413, 422)
}


def answer(content: object, status: int = 200) -> JSONResponse:
    """A view (already in its response model's shape) as JSON, without re-validating it."""
    return JSONResponse(content, status_code=status)


def _rendered(call: Callable[..., Any], *args: Any) -> bytes:
    return json.dumps(call(*args), separators=(",", ":")).encode()


async def listing(svc: Any, call: Callable[..., Any], *args: Any) -> Response:
    """A view that may be large (a listing, the route table), read and serialised on a
    worker thread: never on the event loop, however many rows it has."""
    body = await svc.slow(_rendered, call, *args)
    return Response(body, media_type="application/json")
