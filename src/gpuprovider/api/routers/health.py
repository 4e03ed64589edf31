"""Liveness and version; no token needed. With a token that may read, /health adds the
counts of the tasks that token sees (its tenant's; an admin's: all)."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from gpuprovider import __version__
from gpuprovider.api.deps import Anyone, Svc
from gpuprovider.api.routers import answer
from gpuprovider.api.schemas import HealthOut, VersionOut

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthOut, response_model_exclude_none=True)
async def health(svc: Svc, who: Anyone) -> JSONResponse:
    counts = await svc.read(svc.tasks.counts, who)  # a read either way: the store answers
    return answer({"status": "ok"} if counts is None else {"status": "ok", "tasks": counts})


@router.get("/version", response_model=VersionOut)
async def version() -> VersionOut:
    return VersionOut(name="gpuprovider", version=__version__, api="v1")
