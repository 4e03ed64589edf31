"""What every router shares: the services, and who the caller is."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ParamSpec, TypeVar

from fastapi import Depends, Header, Request
from starlette.concurrency import run_in_threadpool

from gpuprovider.domain.records import TokenRecord
from gpuprovider.service.errors import Unavailable
from gpuprovider.service.nodes import NodeService
from gpuprovider.service.proofs import ProofService
from gpuprovider.service.tasks import TaskService
from gpuprovider.service.tokens import TokenService
from gpuprovider.store.store import Store

P = ParamSpec("P")
T = TypeVar("T")


@dataclass
class Services:
    """What the routers call, and where each call runs: never on the event loop that
    serves every request if it could wait. A read of a SQLite store runs on the loop:
    in WAL mode a reader waits for no one, and the hop to a thread would cost more than
    the read. A write runs on the loop only when the store's turn to write is free at
    once (SQLite commits do not wait for the disk); else it waits its turn on a worker
    thread. A call that asks a node or computes at length always runs on a thread. On
    PostgreSQL every store call is a network round trip: all go to threads."""

    tasks: TaskService
    nodes: NodeService
    tokens: TokenService
    store: Store
    proofs: ProofService | None = None

    @property
    def reads_wait(self) -> bool:
        return not self.store.is_sqlite

    async def read(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if self.reads_wait:
            return await run_in_threadpool(call, *args, **kwargs)
        return call(*args, **kwargs)

    async def write(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        with self.store.writing_at_once() as held:
            if held:
                return call(*args, **kwargs)
        return await run_in_threadpool(call, *args, **kwargs)

    async def call(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await run_in_threadpool(call, *args, **kwargs)


async def services(request: Request) -> Services:
    return request.app.state.services


async def proofs(request: Request) -> ProofService:
    found = request.app.state.services.proofs
    if found is None:
        raise Unavailable("proof of GPU is not served by this provider")
    return found


def needs(scope: str) -> Any:
    """A dependency: the caller, from its bearer token, who must hold `scope` (admin
    holds every scope). Async, as every dependency here: FastAPI would run a plain
    function on a worker thread; a token not in the cache is read like any read."""

    async def caller(
        request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> TokenRecord:
        services: Services = request.app.state.services
        tokens = services.tokens
        who = tokens.cached(authorization) or await services.read(
            tokens.authenticate, authorization
        )
        return TokenService.require(who, scope)

    return Depends(caller)


Svc = Annotated[Services, Depends(services)]
Reader = Annotated[TokenRecord, needs("read")]
Submitter = Annotated[TokenRecord, needs("submit")]
Admin = Annotated[TokenRecord, needs("admin")]
Verifier = Annotated[TokenRecord, needs("verify")]
