"""/gpus/{uuid}/proof: proof of GPU, answered by this provider (scope `verify`).

A session: POST challenge (fill, untimed), POST walk (the timed part), POST open, then
POST result with the verdict the verifier signed (stored only from trusted keys)."""

from fastapi import APIRouter
from fastapi.responses import Response

from gpuprovider.api.deps import Proofs, Verifier
from gpuprovider.api.routers import ERRORS
from gpuprovider.api.schemas import (
    AttestationOut,
    AttestIn,
    ChallengeIn,
    CommitmentOut,
    FilledOut,
    OpeningsIn,
    ProofInfoOut,
    SignedVerdictIn,
    VerdictStoredOut,
    WalkIn,
)

router = APIRouter(prefix="/gpus/{uuid}/proof", tags=["proof of GPU"], responses=ERRORS)


@router.get("", response_model=ProofInfoOut)
def proof_info(uuid: str, who: Verifier, service: Proofs) -> dict:
    return service.describe(uuid)


@router.post("/challenge", response_model=FilledOut)
async def challenge(uuid: str, body: ChallengeIn, who: Verifier, service: Proofs) -> dict:
    """Take a challenge and fill memory (the provider keeps serving meanwhile)."""
    return await service.prepare(uuid, body.model_dump(), who.name)


@router.post("/walk", response_model=CommitmentOut)
async def walk(uuid: str, body: WalkIn, who: Verifier, service: Proofs) -> dict:
    """Walk from the verifier's nonce and commit: the part the verifier times."""
    return await service.walk(uuid, body.challenge_id, body.nonce, who.name)


@router.post("/attestation", response_model=AttestationOut)
async def attest(uuid: str, body: AttestIn, who: Verifier, service: Proofs) -> dict:
    """NVIDIA CC attestation of the GPU for this proof (409 where the GPU has none)."""
    return await service.attest(uuid, body.challenge_id, body.nonce, who.name)


@router.post(
    "/open",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def open_rows(uuid: str, body: OpeningsIn, who: Verifier, service: Proofs) -> Response:
    opened = service.open(uuid, body.challenge_id, body.openings, who.name)
    return Response(opened, media_type="application/octet-stream")


@router.post("/result", response_model=VerdictStoredOut)
def result(uuid: str, body: SignedVerdictIn, who: Verifier, service: Proofs) -> dict:
    verdict = service.record(uuid, body.model_dump(), who.name)
    return {"gpu_uuid": uuid, "stored": True, "passed": verdict["passed"]}
