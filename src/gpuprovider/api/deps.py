"""What every router shares: the services, and who the caller is."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Request

from gpuprovider.domain.records import TokenRecord
from gpuprovider.service.errors import Unavailable
from gpuprovider.service.nodes import NodeService
from gpuprovider.service.proofs import ProofService
from gpuprovider.service.tasks import TaskService
from gpuprovider.service.tokens import TokenService


@dataclass
class Services:
    tasks: TaskService
    nodes: NodeService
    tokens: TokenService
    proofs: ProofService | None = None


def services(request: Request) -> Services:
    return request.app.state.services


def proofs(request: Request) -> ProofService:
    found = request.app.state.services.proofs
    if found is None:
        raise Unavailable("proof of GPU is not served by this provider")
    return found


# Dependencies are async so that a request costs one hop to a worker thread (its
# handler), not one per dependency; a token not in the cache is read on a thread.
async def caller(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> TokenRecord:
    tokens: TokenService = request.app.state.services.tokens
    return tokens.cached(authorization) or await asyncio.to_thread(
        tokens.authenticate, authorization
    )


def needs(scope: str) -> Any:
    """A dependency: the caller, who must hold `scope` (admin holds every scope)."""

    async def check(who: Annotated[TokenRecord, Depends(caller)]) -> TokenRecord:
        return TokenService.require(who, scope)

    return Depends(check)


Svc = Annotated[Services, Depends(services)]
Reader = Annotated[TokenRecord, needs("read")]
Submitter = Annotated[TokenRecord, needs("submit")]
Admin = Annotated[TokenRecord, needs("admin")]
Verifier = Annotated[TokenRecord, needs("verify")]
