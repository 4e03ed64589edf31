"""Swan Computing Provider's job API (`[market.<name>] kind = "swan"`), at the paths
Swan's orchestrator calls, answering in its shapes. No bearer token: each request is
signed by the orchestrator (service/swan.py checks it before anything else)."""

import json
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gpuprovider.api.deps import Services
from gpuprovider.market.swan import SwanError
from gpuprovider.service.swan import SwanService

router = APIRouter(prefix="/computing/lagrange", tags=["swan"])


async def _answer(request: Request, call: Callable[[SwanService], dict[str, Any]]) -> JSONResponse:
    services: Services = request.app.state.services
    try:
        if services.swan is None:
            raise SwanError(404, SwanError.NOT_FOUND, "this provider takes no work from Swan")
        return JSONResponse(await services.slow(call, services.swan))
    except SwanError as exc:
        return JSONResponse(exc.body(), status_code=exc.status)


async def _body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError:
        return None  # parse() refuses it: the body must be a JSON object


@router.post("/jobs")
async def receive(request: Request) -> JSONResponse:
    body = await _body(request)
    return await _answer(request, lambda swan: swan.receive(body))


@router.delete("/jobs")
async def cancel(request: Request) -> JSONResponse:
    query = dict(request.query_params)
    return await _answer(request, lambda swan: swan.cancel(query))


@router.post("/jobs/renew")
async def renew(request: Request) -> JSONResponse:
    body = await _body(request)
    return await _answer(request, lambda swan: swan.renew(body))


@router.get("/job/{job_uuid}")
async def status(job_uuid: str, request: Request) -> JSONResponse:
    query = dict(request.query_params)
    return await _answer(request, lambda swan: swan.status(job_uuid, query))
