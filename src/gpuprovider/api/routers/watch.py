"""Watch and repair: /metrics for Prometheus (a token with the `metrics` scope), what
repair rules did, booked/idle accounting, a GPU's history, a test alert."""

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response

from gpuprovider.api.deps import Admin, MetricsOf, Reader, Repair, Scraper, Svc
from gpuprovider.api.routers import ERRORS, answer
from gpuprovider.api.schemas import (
    AlertTestOut,
    GpuHistoryOut,
    RepairEventOut,
    RepairRulesOut,
    UsageOut,
)
from gpuprovider.service.metrics import CONTENT_TYPE

router = APIRouter(tags=["watch"], responses=ERRORS)
# /metrics sits at the root, where Prometheus looks by default
metrics_router = APIRouter(tags=["watch"], responses=ERRORS)


@metrics_router.get("/metrics", response_class=Response)
async def metrics(who: Scraper, svc: Svc, found: MetricsOf) -> Response:
    return Response(await svc.slow(found.render), media_type=CONTENT_TYPE)


@router.get("/repairs", response_model=list[RepairEventOut])
async def repairs(
    who: Admin,  # the details name the tasks moved, whoever's they are
    svc: Svc,
    repair: Repair,
    node: str | None = None,
    gpu: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 100,
) -> JSONResponse:
    return answer(await svc.read(repair.events, node, gpu, limit))


@router.get("/repairs/rules", response_model=RepairRulesOut)
async def rules(who: Reader, repair: Repair) -> JSONResponse:
    return answer(repair.rules())


@router.get("/accounting", response_model=list[UsageOut])
async def accounting(
    who: Reader,
    svc: Svc,
    repair: Repair,
    days: Annotated[float | None, Query(gt=0, le=3660)] = None,
) -> JSONResponse:
    return answer(await svc.read(repair.accounting, who, days))


@router.get("/gpus/{uuid}/history", response_model=GpuHistoryOut)
async def history(uuid: str, who: Reader, svc: Svc, repair: Repair) -> JSONResponse:
    return answer(await svc.read(repair.gpu_history, uuid))


@router.post("/alerts/test", response_model=AlertTestOut)
async def test_alert(who: Admin, svc: Svc, repair: Repair) -> JSONResponse:
    return answer(await svc.slow(repair.test_alert, who))
