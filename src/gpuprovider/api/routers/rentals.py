"""/rentals: environments tenants log in to over SSH."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from gpuprovider.api.deps import Reader, Rented, Submitter, Svc
from gpuprovider.api.routers import ERRORS, answer, listing
from gpuprovider.api.schemas import EvictIn, RentalOut
from gpuprovider.domain.rentals import RentalSpec

router = APIRouter(tags=["rentals"], responses=ERRORS)


@router.post("/rentals", response_model=RentalOut, status_code=201)
async def rent(body: RentalSpec, who: Submitter, svc: Svc, rentals: Rented) -> JSONResponse:
    return answer(await svc.slow(rentals.create, body, who), 201)


@router.get("/rentals", response_model=list[RentalOut])
async def listed(who: Reader, svc: Svc, rentals: Rented) -> Response:
    return await listing(svc, rentals.list, who)


@router.get("/rentals/{ref}", response_model=RentalOut)
async def rental(ref: str, who: Reader, svc: Svc, rentals: Rented) -> JSONResponse:
    return answer(await svc.read(rentals.get, ref, who))


@router.post("/rentals/{ref}/stop", response_model=RentalOut)
async def stop(ref: str, who: Submitter, svc: Svc, rentals: Rented) -> JSONResponse:
    return answer(await svc.write(rentals.stop, ref, who))


@router.post("/rentals/{ref}/start", response_model=RentalOut)
async def start(ref: str, who: Submitter, svc: Svc, rentals: Rented) -> JSONResponse:
    return answer(await svc.write(rentals.start, ref, who))


@router.post("/rentals/{ref}/evict", response_model=RentalOut)
async def evict(ref: str, body: EvictIn, who: Submitter, svc: Svc, rentals: Rented) -> JSONResponse:
    return answer(await svc.write(rentals.evict, ref, body.reason, who))


@router.delete("/rentals/{ref}", response_model=RentalOut)
async def delete(ref: str, who: Submitter, svc: Svc, rentals: Rented) -> JSONResponse:
    return answer(await svc.slow(rentals.delete, ref, who))
