"""Liveness and version; no token needed."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from gpuprovider import __version__
from gpuprovider.api.deps import Svc
from gpuprovider.api.routers import answer
from gpuprovider.api.schemas import HealthOut, VersionOut

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthOut)
async def health(svc: Svc) -> JSONResponse:
    return answer({"status": "ok", "tasks": await svc.read(svc.tasks.counts)})


@router.get("/version", response_model=VersionOut)
async def version() -> VersionOut:
    return VersionOut(name="gpuprovider", version=__version__, api="v1")
