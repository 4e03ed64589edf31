"""/nodes: the pool, operators' actions on it, and check results."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from gpuprovider.api.deps import Admin, Reader, Svc
from gpuprovider.api.routers import ERRORS, answer, listing
from gpuprovider.api.schemas import (
    CheckRunIn,
    ChecksSavedOut,
    CordonIn,
    DrainOut,
    NodeChecksOut,
    NodeDetailOut,
    NodeOut,
    NodeStatusOut,
    RemovedOut,
)
from gpuprovider.check.result import Result

router = APIRouter(prefix="/nodes", tags=["nodes"], responses=ERRORS)


@router.get("", response_model=list[NodeOut])
async def nodes(who: Reader, svc: Svc, removed: bool = False) -> Response:
    return await listing(svc, svc.nodes.list, removed)


@router.get("/{ref}", response_model=NodeDetailOut)
async def node(ref: str, who: Reader, svc: Svc) -> JSONResponse:
    return answer(await svc.read(svc.nodes.get, ref))


@router.post("/{ref}/drain", response_model=DrainOut)
async def drain(ref: str, who: Admin, svc: Svc) -> JSONResponse:
    return answer(await svc.write(svc.nodes.drain, ref, who))


@router.post("/{ref}/cordon", response_model=NodeStatusOut)
async def cordon(ref: str, who: Admin, svc: Svc, body: CordonIn | None = None) -> JSONResponse:
    return answer(await svc.write(svc.nodes.cordon, ref, who, body.reason if body else ""))


@router.post("/{ref}/resume", response_model=NodeStatusOut)
async def resume(ref: str, who: Admin, svc: Svc) -> JSONResponse:
    """Give a cordoned or drained node work again (`uncordon` says the same)."""
    return answer(await svc.write(svc.nodes.resume, ref, who))


@router.delete("/{ref}", response_model=RemovedOut)
async def remove(ref: str, who: Admin, svc: Svc) -> JSONResponse:
    return answer(await svc.write(svc.nodes.remove, ref, who))


@router.get("/{ref}/checks", response_model=NodeChecksOut)
async def checks(ref: str, who: Reader, svc: Svc) -> JSONResponse:
    return answer(await svc.read(svc.nodes.checks, ref))


@router.post("/{ref}/checks", response_model=ChecksSavedOut)
async def save_checks(ref: str, body: CheckRunIn, who: Admin, svc: Svc) -> JSONResponse:
    results = [Result.from_dict(r.model_dump()) for r in body.results]
    return answer(await svc.write(svc.nodes.save_checks, ref, results, body.ran_at))
