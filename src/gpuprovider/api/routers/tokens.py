"""/tokens: API tokens (admin only)."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from gpuprovider.api.deps import Admin, Svc
from gpuprovider.api.routers import ERRORS, answer
from gpuprovider.api.schemas import TokenCreatedOut, TokenIn, TokenOut

router = APIRouter(prefix="/tokens", tags=["tokens"], responses=ERRORS)


@router.post("", status_code=201, response_model=TokenCreatedOut)
async def create_token(body: TokenIn, who: Admin, svc: Svc) -> JSONResponse:
    made = await svc.write(
        svc.tokens.create, body.name, body.scopes, body.tenant, body.expires_in_s
    )
    return answer(made, 201)


@router.get("", response_model=list[TokenOut])
async def list_tokens(who: Admin, svc: Svc) -> JSONResponse:
    """Every token, revoked and expired ones too (never a secret)."""
    return answer(await svc.read(svc.tokens.list))


@router.delete("/{name}", response_model=TokenOut)
async def revoke_token(name: str, who: Admin, svc: Svc) -> JSONResponse:
    """Revoke a token: refused from now on (within the auth cache's 5 s on daemons
    that share the store)."""
    return answer(await svc.write(svc.tokens.revoke, name))
