"""/market: the markets this provider takes work from, their leases and earnings
(operator only: a tenant sees its own tasks, not the provider's business)."""

from typing import Any

from fastapi import APIRouter

from gpuprovider.api.deps import Admin, Svc
from gpuprovider.api.routers import ERRORS

router = APIRouter(prefix="/market", tags=["market"], responses=ERRORS)


@router.get("")
async def markets(who: Admin, svc: Svc) -> list[dict[str, Any]]:
    return [await svc.read(m.status) for m in svc.markets]


@router.get("/leases")
async def leases(who: Admin, svc: Svc) -> list[dict[str, Any]]:
    return [lease for m in svc.markets for lease in await svc.read(m.leases)]


@router.get("/earnings")
async def earnings(who: Admin, svc: Svc) -> list[dict[str, Any]]:
    return [await svc.slow(m.earnings) for m in svc.markets]
