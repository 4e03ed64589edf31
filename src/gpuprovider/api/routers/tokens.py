"""/tokens: API tokens (admin only)."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from gpuprovider.api.deps import Admin, Svc
from gpuprovider.api.routers import ERRORS, answer
from gpuprovider.api.schemas import TokenCreatedOut, TokenIn, TokenOut

router = APIRouter(prefix="/tokens", tags=["tokens"], responses=ERRORS)


@router.post("", status_code=201, response_model=TokenCreatedOut)
async def create_token(body: TokenIn, who: Admin, svc: Svc) -> JSONResponse:
    return answer(await svc.write(svc.tokens.create, body.name, body.scopes, body.tenant), 201)


@router.get("", response_model=list[TokenOut])
async def list_tokens(who: Admin, svc: Svc) -> JSONResponse:
    return answer(await svc.read(svc.tokens.list))
