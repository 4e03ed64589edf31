"""/gpus: every GPU of the pool, and cordons on one."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from gpuprovider.api.deps import Admin, Reader, Svc
from gpuprovider.api.routers import ERRORS, answer, listing
from gpuprovider.api.schemas import CordonIn, GpuCordonOut, GpuOut

router = APIRouter(prefix="/gpus", tags=["gpus"], responses=ERRORS)


@router.get("", response_model=list[GpuOut])
async def gpus(who: Reader, svc: Svc) -> Response:
    return await listing(svc, svc.nodes.gpus, who)


@router.post("/{uuid}/cordon", response_model=GpuCordonOut)
async def cordon(uuid: str, who: Admin, svc: Svc, body: CordonIn | None = None) -> JSONResponse:
    return answer(await svc.write(svc.nodes.cordon_gpu, uuid, who, body.reason if body else ""))


@router.post("/{uuid}/uncordon", response_model=GpuCordonOut)
async def uncordon(uuid: str, who: Admin, svc: Svc, force: bool = False) -> JSONResponse:
    """A repair rule's cordon is lifted by a passing check, or here with `force`."""
    return answer(await svc.write(svc.nodes.uncordon_gpu, uuid, force))
