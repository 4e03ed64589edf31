"""What every router shares: the services, and who the caller is."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, ParamSpec, TypeVar

from fastapi import Depends, Header, Request

from gpuprovider.domain.records import TokenRecord
from gpuprovider.service.calls import Calls
from gpuprovider.service.dashboard import Dashboard
from gpuprovider.service.errors import Unavailable
from gpuprovider.service.files import Uploads, Volumes
from gpuprovider.service.journal import Journal
from gpuprovider.service.market import MarketService
from gpuprovider.service.metrics import Metrics
from gpuprovider.service.nodes import NodeService
from gpuprovider.service.pipelines import PipelineService
from gpuprovider.service.proofs import ProofService
from gpuprovider.service.rentals import RentalService
from gpuprovider.service.repair import RepairService
from gpuprovider.service.serving import Serving
from gpuprovider.service.swan import SwanService
from gpuprovider.service.tasks import TaskService
from gpuprovider.service.tokens import TokenService

P = ParamSpec("P")
T = TypeVar("T")


@dataclass
class Services:
    """What the routers call, and where each call runs (`service/calls.py`)."""

    tasks: TaskService
    nodes: NodeService
    tokens: TokenService
    calls: Calls
    journal: Journal
    proofs: ProofService | None = None
    repair: RepairService | None = None
    metrics: Metrics | None = None
    serving: Serving | None = None
    markets: list[MarketService] = field(default_factory=list)
    swan: SwanService | None = None  # Swan's job API, when a [market] is kind swan
    uploads: Uploads | None = None
    volumes: Volumes | None = None
    dashboard: Dashboard | None = None  # the figures of the dashboard's pages (/ui)
    pipelines: PipelineService | None = None
    rentals: RentalService | None = None

    async def read(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.calls.read(call, *args, **kwargs)

    async def write(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.calls.write(call, *args, **kwargs)

    async def slow(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.calls.slow(call, *args, **kwargs)


async def services(request: Request) -> Services:
    return request.app.state.services


def optional(part: str, what: str) -> Any:
    """A dependency: the `Services` part `part`, or 503 saying `what` is not served."""

    async def found(request: Request) -> Any:
        value = getattr(request.app.state.services, part)
        if value is None:
            raise Unavailable(f"{what} is not served by this provider")
        return value

    return Depends(found)


def needs(scope: str) -> Any:
    """A dependency: the caller, from its bearer token, who must hold `scope` (admin
    holds every scope). Async, as every dependency here: FastAPI would run a plain
    function on a worker thread; a token not in the cache is read like any read."""

    async def caller(
        request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> TokenRecord:
        return TokenService.require(await _identify(request, authorization), scope)

    return Depends(caller)


async def _identify(request: Request, authorization: str | None) -> TokenRecord:
    services: Services = request.app.state.services
    tokens = services.tokens
    cached = tokens.cached(authorization)
    if cached is not None:
        return cached
    return await services.read(tokens.authenticate, authorization)


async def maybe_caller(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> TokenRecord | None:
    """The caller when a token is sent (a wrong one is refused), else None."""
    return None if authorization is None else await _identify(request, authorization)


Svc = Annotated[Services, Depends(services)]
Proofs = Annotated[ProofService, optional("proofs", "proof of GPU")]
Repair = Annotated[RepairService, optional("repair", "watch and repair")]
MetricsOf = Annotated[Metrics, optional("metrics", "metrics")]
UploadStore = Annotated[Uploads, optional("uploads", "uploads")]
VolumeStore = Annotated[Volumes, optional("volumes", "volumes")]
Served = Annotated[Serving, optional("serving", "services")]
Rented = Annotated[RentalService, optional("rentals", "rentals")]
Reader = Annotated[TokenRecord, needs("read")]
Submitter = Annotated[TokenRecord, needs("submit")]
Admin = Annotated[TokenRecord, needs("admin")]
Verifier = Annotated[TokenRecord, needs("verify")]
Scraper = Annotated[TokenRecord, needs("metrics")]
GatewayCaller = Annotated[TokenRecord, needs("gateway")]
Anyone = Annotated[TokenRecord | None, Depends(maybe_caller)]
