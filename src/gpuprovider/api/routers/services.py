"""/services: replica sets behind the gateway; /gateway: the router's routes and figures."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from gpuprovider.api.deps import GatewayCaller, Reader, Served, Submitter, Svc
from gpuprovider.api.routers import ERRORS, answer, listing
from gpuprovider.api.schemas import GatewayStatsIn, RoutesOut, ScaleIn, ServiceOut

router = APIRouter(tags=["services"], responses=ERRORS)


@router.get("/services", response_model=list[ServiceOut])
async def services(who: Reader, svc: Svc, serving: Served) -> Response:
    return await listing(svc, serving.list, who)


@router.get("/services/{ref}", response_model=ServiceOut)
async def service(ref: str, who: Reader, svc: Svc, serving: Served) -> JSONResponse:
    return answer(await svc.read(serving.get, ref, who))


@router.post("/services/{ref}/scale", response_model=ServiceOut)
async def scale(ref: str, body: ScaleIn, who: Submitter, svc: Svc, serving: Served) -> JSONResponse:
    return answer(await svc.write(serving.scale, ref, body.replicas, who))


@router.delete("/services/{ref}", response_model=ServiceOut)
async def stop(ref: str, who: Submitter, svc: Svc, serving: Served) -> JSONResponse:
    return answer(await svc.write(serving.stop, ref, who))


@router.get("/gateway/routes", response_model=RoutesOut)
async def routes(who: GatewayCaller, svc: Svc, serving: Served) -> Response:
    return await listing(svc, serving.routes)


@router.post("/gateway/stats", status_code=204)
async def stats(body: GatewayStatsIn, who: GatewayCaller, serving: Served) -> None:
    serving.report([item.model_dump() for item in body.services])
