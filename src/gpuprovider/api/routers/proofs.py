"""/gpus/{uuid}/proof: proof of GPU, answered by this provider (scope `verify`)."""

from fastapi import APIRouter
from fastapi.responses import Response

from gpuprovider.api.deps import Proofs, Verifier
from gpuprovider.api.routers import ERRORS
from gpuprovider.api.schemas import (
    ChallengeIn,
    CommitmentOut,
    OpeningsIn,
    ProofInfoOut,
    VerdictIn,
    VerdictStoredOut,
)

router = APIRouter(prefix="/gpus/{uuid}/proof", tags=["proof of GPU"], responses=ERRORS)


@router.get("", response_model=ProofInfoOut)
def proof_info(uuid: str, who: Verifier, service: Proofs) -> dict:
    return service.describe(uuid)


@router.post("/challenge", response_model=CommitmentOut)
async def challenge(uuid: str, body: ChallengeIn, who: Verifier, service: Proofs) -> dict:
    """Answer a challenge: fill, chain, commit (the provider keeps serving meanwhile)."""
    return await service.answer(uuid, body.model_dump())


@router.post(
    "/open",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def open_rows(uuid: str, body: OpeningsIn, who: Verifier, service: Proofs) -> Response:
    opened = service.open(uuid, body.challenge_id, body.openings)
    return Response(opened, media_type="application/octet-stream")


@router.post("/result", response_model=VerdictStoredOut)
def result(uuid: str, body: VerdictIn, who: Verifier, service: Proofs) -> dict:
    service.record(uuid, body.model_dump(), verifier=who.name)
    return {"gpu_uuid": uuid, "stored": True}
