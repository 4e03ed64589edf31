"""/market: the markets this provider takes work from, their leases and earnings
(operator only: a tenant sees its own tasks, not the provider's business)."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from gpuprovider.api.deps import Admin, Svc
from gpuprovider.api.routers import ERRORS, answer, listing
from gpuprovider.api.schemas import EarningsOut, LeaseOut, MarketOut

router = APIRouter(prefix="/market", tags=["market"], responses=ERRORS)


@router.get("", response_model=list[MarketOut])
async def markets(who: Admin, svc: Svc) -> JSONResponse:
    return answer([await svc.read(m.status) for m in svc.markets])


@router.get("/leases", response_model=list[LeaseOut])
async def leases(who: Admin, svc: Svc) -> Response:
    return await listing(svc, lambda: [lease for m in svc.markets for lease in m.leases()])


@router.get("/earnings", response_model=list[EarningsOut])
async def earnings(who: Admin, svc: Svc) -> JSONResponse:
    return answer([await svc.slow(m.earnings) for m in svc.markets])
