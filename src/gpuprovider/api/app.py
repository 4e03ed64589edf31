"""HTTP API under /api/v1. Handlers parse, authorise and call the service layer."""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from gpuprovider import __version__
from gpuprovider.backends.base import Backend
from gpuprovider.check.registry import GROUPS
from gpuprovider.check.result import Result
from gpuprovider.domain.spec import TaskSpec
from gpuprovider.domain.states import TERMINAL, TaskState
from gpuprovider.identity.keys import hash_token, new_token
from gpuprovider.service.errors import Conflict, NotFound, Rejected, ServiceError
from gpuprovider.service.nodes import NodeService
from gpuprovider.service.proofs import ProofService
from gpuprovider.service.tasks import TaskService
from gpuprovider.service.views import gpu_views, node_view, task_view
from gpuprovider.store.records import TaskRecord, TokenRecord
from gpuprovider.store.store import Store

SCOPES = ("read", "submit", "admin", "verify")
FOLLOW_POLL_S = 0.2
LOG_CHUNK = 1 << 16


@dataclass
class ApiContext:
    store: Store
    tasks: TaskService
    max_body_bytes: int
    backend: Backend  # where task output is read from: the node that ran the task
    on_nodes_changed: Callable[[], None] = lambda: None  # GPU health may have changed
    proofs: ProofService | None = None


class ProofParamsIn(BaseModel):
    model_config = {"extra": "forbid"}
    n: int
    m: int
    matrices: int
    per_step: int
    steps: int
    epoch: int
    openings: int


class ChallengeIn(BaseModel):
    model_config = {"extra": "forbid"}
    id: Annotated[str, Field(max_length=64)]
    seed: Annotated[str, Field(max_length=128)]
    gpu_uuid: Annotated[str, Field(max_length=96)]
    provider_key: Annotated[str, Field(max_length=128)]
    params: ProofParamsIn


class OpeningsIn(BaseModel):
    model_config = {"extra": "forbid"}
    challenge_id: Annotated[str, Field(max_length=64)]
    openings: Annotated[
        list[Annotated[list[int], Field(min_length=3, max_length=3)]],
        Field(min_length=1, max_length=100_000),
    ]


class VerdictIn(BaseModel):
    model_config = {"extra": "forbid"}
    challenge_id: Annotated[str, Field(max_length=64)]
    passed: bool
    reason: Annotated[str, Field(max_length=2000)]
    figures: dict[str, Any] = Field(default_factory=dict)


class CheckResultIn(BaseModel):
    """One result of `gpuprovider check`, as the CLI posts it."""

    model_config = {"extra": "forbid"}
    status: Literal["PASS", "WARN", "FAIL", "SKIP"]
    value: float | Annotated[str, Field(max_length=500)] | None = None
    unit: Annotated[str, Field(max_length=32)] = ""
    threshold: Annotated[str, Field(max_length=2000)] = ""
    advice: Annotated[str, Field(max_length=2000)] = ""
    subject: Annotated[str, Field(max_length=64)] = ""
    gpu_uuid: Annotated[str, Field(max_length=96)] = ""
    data: dict[str, Any] = Field(default_factory=dict)
    group: Literal[GROUPS]
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")]


class CheckRunIn(BaseModel):
    model_config = {"extra": "forbid"}
    ran_at: Annotated[float, Field(gt=0)]
    results: Annotated[list[CheckResultIn], Field(min_length=1, max_length=10_000)]


class TokenCache:
    """Token lookups, remembered for a few seconds: every request carries one."""

    TTL_S = 5.0

    def __init__(self, store: Store):
        self.store = store
        self._seen: dict[str, tuple[float, TokenRecord]] = {}

    def get(self, token_hash: str) -> TokenRecord | None:
        now = time.monotonic()
        hit = self._seen.get(token_hash)
        if hit and now - hit[0] < self.TTL_S:
            return hit[1]
        record = self.store.token_by_hash(token_hash)
        if record is not None:
            if len(self._seen) > 10_000:
                self._seen.clear()
            self._seen[token_hash] = (now, record)
        return record


class TokenRequest(BaseModel):
    model_config = {"extra": "forbid"}
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    scopes: list[str] = Field(default_factory=lambda: ["read", "submit"], min_length=1)
    tenant: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")] | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        self.status, self.message, self.headers = status, message, headers


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _field_errors(exc: RequestValidationError) -> list[str]:
    lines = []
    for item in exc.errors():
        loc = [str(p) for p in item["loc"] if p not in ("body", "query", "path")]
        msg = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown field; check its spelling"
        lines.append(f"{'.'.join(loc) or 'body'}: {msg}")
    return lines


class BodyLimit:
    """Refuses request bodies over the limit with 413 before they are read whole."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = _error(413, f"request body is larger than the limit of {self.limit} bytes")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_big(scope, receive, send)
        seen = 0
        refused = False

        async def limited_receive() -> dict:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                # Answer 413 now; the app sees the client gone and its reply is dropped.
                refused = True
                await too_big(scope, receive, send)
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            if not refused:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)


def create_app(ctx: ApiContext) -> FastAPI:
    app = FastAPI(
        title="gpuprovider",
        version=__version__,
        openapi_url="/api/v1/openapi.json",
        docs_url="/api/v1/docs",
        redoc_url=None,
    )
    store, tasks = ctx.store, ctx.tasks
    nodes_service = NodeService(store, ctx.on_nodes_changed, tasks.on_cancel_requested)
    tokens_seen = TokenCache(store)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = _field_errors(exc)
        return _error(422, "; ".join(details), details=details)

    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        response = _error(exc.status, exc.message)
        response.headers.update(exc.headers or {})
        return response

    async def principal(authorization: Annotated[str | None, Header()] = None) -> TokenRecord:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise ApiError(
                401,
                "missing bearer token: send 'Authorization: Bearer <token>'",
                {"WWW-Authenticate": "Bearer"},
            )
        record = tokens_seen.get(hash_token(authorization[7:].strip()))
        if record is None:
            raise ApiError(401, "unknown or revoked token", {"WWW-Authenticate": "Bearer"})
        return record

    def needs(scope: str) -> Any:
        # async: FastAPI would run a plain def in a thread, and the store is not shared
        # across threads.
        async def check(who: Annotated[TokenRecord, Depends(principal)]) -> TokenRecord:
            if "admin" not in who.scopes and scope not in who.scopes:
                raise ApiError(403, f"token {who.name!r} lacks the {scope!r} scope")
            return who

        return Depends(check)

    def visible_task(ref: str, who: TokenRecord) -> TaskRecord:
        task = tasks.get(ref)
        if "admin" not in who.scopes and task.tenant != who.tenant:
            raise NotFound(f"no task with id or name {ref!r}")
        return task

    def full_view(task: TaskRecord) -> dict[str, Any]:
        alloc = store.allocation(task.id)
        node = next(iter(store.nodes([alloc.node_id])), None) if alloc else None
        return task_view(task, alloc, node, store.events(task.id))

    @app.get("/api/v1/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "tasks": store.count_tasks()}

    @app.get("/api/v1/version")
    async def version() -> dict[str, str]:
        return {"name": "gpuprovider", "version": __version__, "api": "v1"}

    @app.post("/api/v1/tasks", status_code=201)
    async def submit(
        spec: TaskSpec, who: Annotated[TokenRecord, needs("submit")], dry_run: bool = False
    ) -> Any:
        if dry_run:
            return JSONResponse(tasks.dry_run(spec), status_code=200)
        return JSONResponse(task_view(tasks.submit(spec, who.tenant)), status_code=201)

    @app.get("/api/v1/tasks")
    async def list_tasks(
        who: Annotated[TokenRecord, needs("read")],
        state: Annotated[list[str] | None, Query()] = None,
        name: str | None = None,
        kind: str | None = None,
        limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
    ) -> JSONResponse:
        try:
            states = [TaskState(s) for item in state or [] for s in item.split(",") if s]
        except ValueError as exc:
            raise Rejected(
                f"state: {exc}; known: {', '.join(s.value for s in TaskState)}"
            ) from None
        tenant = None if "admin" in who.scopes else who.tenant
        found = store.tasks(
            states=states, name=name, kind=kind, tenant=tenant, limit=limit, newest_first=True
        )
        return JSONResponse([task_view(t) for t in found])

    @app.get("/api/v1/tasks/{ref}")
    async def get_task(ref: str, who: Annotated[TokenRecord, needs("read")]) -> dict[str, Any]:
        return JSONResponse(full_view(visible_task(ref, who)))

    @app.get("/api/v1/tasks/{ref}/events")
    async def task_events(ref: str, who: Annotated[TokenRecord, needs("read")]) -> list[Any]:
        return full_view(visible_task(ref, who))["events"]

    @app.post("/api/v1/tasks/{ref}/cancel")
    async def cancel(ref: str, who: Annotated[TokenRecord, needs("submit")]) -> dict[str, Any]:
        task = visible_task(ref, who)
        return task_view(tasks.cancel(task.id, who.name))

    @app.get("/api/v1/tasks/{ref}/logs")
    async def logs(
        ref: str,
        who: Annotated[TokenRecord, needs("read")],
        follow: bool = False,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> Any:
        task = visible_task(ref, who)
        if not follow:
            text = b""
            while chunk := await read_log(task, offset + len(text)):
                text += chunk
            return PlainTextResponse(text.decode(errors="replace"))
        return StreamingResponse(_follow(task.id, offset), media_type="text/event-stream")

    async def read_log(task: TaskRecord, offset: int) -> bytes:
        """The next piece of a task's output, from whichever node runs it."""
        if not task.run_dir:
            return b""
        return await asyncio.to_thread(
            ctx.backend.read_log, task.node_id or "", task.run_dir, offset, LOG_CHUNK
        )

    async def _follow(task_id: str, offset: int) -> AsyncIterator[str]:
        """Server-sent events: one `data:` event per chunk, `event: end` when done."""
        position = offset
        while True:
            task = store.task(task_id)
            done = task is None or task.state in TERMINAL
            chunk = await read_log(task, position) if task else b""
            if chunk:
                position += len(chunk)
                yield f"data: {json.dumps(chunk.decode(errors='replace'))}\n\n"
                continue
            if done:
                state = task.state.value if task else "gone"
                yield f"event: end\ndata: {json.dumps(state)}\n\n"
                return
            await asyncio.sleep(FOLLOW_POLL_S)

    @app.get("/api/v1/nodes")
    async def nodes(who: Annotated[TokenRecord, needs("read")]) -> list[dict[str, Any]]:
        return JSONResponse([node_view(n) for n in store.nodes()])

    @app.post("/api/v1/nodes/{ref}/drain")
    async def drain_node(ref: str, who: Annotated[TokenRecord, needs("admin")]) -> dict:
        return nodes_service.drain(ref, who.name)

    @app.post("/api/v1/nodes/{ref}/resume")
    async def resume_node(ref: str, who: Annotated[TokenRecord, needs("admin")]) -> dict:
        return nodes_service.resume(ref)

    @app.delete("/api/v1/nodes/{ref}")
    async def remove_node(ref: str, who: Annotated[TokenRecord, needs("admin")]) -> dict:
        return nodes_service.remove(ref)

    @app.get("/api/v1/nodes/{ref}/checks")
    async def node_checks(ref: str, who: Annotated[TokenRecord, needs("read")]) -> dict[str, Any]:
        node = nodes_service.get(ref)
        return {"node_id": node.id, "node": node.name, "results": store.check_results(node.id)}

    @app.post("/api/v1/nodes/{ref}/checks")
    async def save_node_checks(
        ref: str, body: CheckRunIn, who: Annotated[TokenRecord, needs("admin")]
    ) -> dict[str, Any]:
        node = nodes_service.get(ref)
        known = {g.uuid for g in node.gpus}
        strangers = sorted({r.gpu_uuid for r in body.results if r.gpu_uuid} - known)
        if strangers:
            raise ApiError(422, f"GPUs {', '.join(strangers)} are not on node {node.name}")
        results = [Result.from_dict(r.model_dump()) for r in body.results]
        store.save_check_results(node.id, results, body.ran_at)
        ctx.on_nodes_changed()
        return {"node_id": node.id, "saved": len(results)}

    def proofs() -> ProofService:
        if ctx.proofs is None:
            raise ApiError(503, "proof of GPU is not served by this provider")
        return ctx.proofs

    @app.get("/api/v1/gpus/{uuid}/proof")
    async def proof_info(uuid: str, who: Annotated[TokenRecord, needs("verify")]) -> dict:
        return proofs().describe(uuid)

    @app.post("/api/v1/gpus/{uuid}/proof/challenge")
    async def proof_challenge(
        uuid: str, body: ChallengeIn, who: Annotated[TokenRecord, needs("verify")]
    ) -> dict[str, Any]:
        return await proofs().answer(uuid, body.model_dump())

    @app.post("/api/v1/gpus/{uuid}/proof/open")
    async def proof_open(
        uuid: str, body: OpeningsIn, who: Annotated[TokenRecord, needs("verify")]
    ) -> Response:
        opened = proofs().open(uuid, body.challenge_id, body.openings)
        return Response(opened, media_type="application/octet-stream")

    @app.post("/api/v1/gpus/{uuid}/proof/result")
    async def proof_result(
        uuid: str, body: VerdictIn, who: Annotated[TokenRecord, needs("verify")]
    ) -> dict[str, Any]:
        proofs().record(uuid, body.model_dump(), verifier=who.name)
        return {"gpu_uuid": uuid, "stored": True}

    @app.get("/api/v1/gpus")
    async def gpus(who: Annotated[TokenRecord, needs("read")]) -> list[dict[str, Any]]:
        return JSONResponse(gpu_views(store.nodes(), store.active_allocations()))

    @app.post("/api/v1/tokens", status_code=201)
    async def create_token(
        body: TokenRequest, who: Annotated[TokenRecord, needs("admin")]
    ) -> dict[str, Any]:
        unknown = sorted(set(body.scopes) - set(SCOPES))
        if unknown:
            raise Rejected(f"scopes: unknown {unknown}; choose from {list(SCOPES)}")
        token = new_token()
        try:
            record = store.add_token(
                body.name, hash_token(token), body.scopes, body.tenant or body.name
            )
        except ValueError as exc:
            raise Conflict(str(exc)) from None
        return {
            "name": record.name,
            "scopes": record.scopes,
            "tenant": record.tenant,
            "token": token,
        }

    @app.get("/api/v1/tokens")
    async def list_tokens(who: Annotated[TokenRecord, needs("admin")]) -> list[dict[str, Any]]:
        return [
            {"name": t.name, "scopes": t.scopes, "tenant": t.tenant, "created_at": t.created_at}
            for t in store.tokens()
        ]

    return app


def build_asgi(ctx: ApiContext) -> Any:
    return BodyLimit(create_app(ctx), ctx.max_body_bytes)
