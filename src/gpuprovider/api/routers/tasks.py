"""/tasks: submit, dry-run, list, inspect, cancel, logs."""

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from gpuprovider.api.deps import Reader, Submitter, Svc
from gpuprovider.api.routers import ERRORS, answer, listing
from gpuprovider.api.schemas import DryRunOut, EventOut, TaskDetailOut, TaskOut
from gpuprovider.domain.spec import TaskSpec

LOG_LIMIT_MAX = 4 << 20  # bytes of output in one answer
FILE_LIMIT_MAX = 8 << 20  # bytes of a file in one answer

router = APIRouter(prefix="/tasks", tags=["tasks"], responses=ERRORS)


@router.post(
    "",
    status_code=201,
    response_model=TaskOut,
    responses={
        200: {
            "model": DryRunOut | TaskOut,
            "description": "with dry_run: what would happen; with an Idempotency-Key "
            "used before for the same spec: the task it made (Idempotent-Replayed: true)",
        }
    },
)
async def submit(
    spec: TaskSpec,
    who: Submitter,
    svc: Svc,
    dry_run: bool = False,
    idempotency_key: Annotated[
        str | None,
        Header(
            pattern=r"^[!-~]{1,255}$",
            description="Any printable ASCII up to 255 characters, unique per submission: "
            "a retry with the same key and spec gets the same task, never a second one",
        ),
    ] = None,
) -> JSONResponse:
    if dry_run:
        return answer(await svc.slow(svc.tasks.dry_run, spec, who))
    await svc.slow(svc.tasks.check_runnable, spec, None, who.tenant)  # may ask the engine
    task, created = await svc.write(svc.tasks.submit, spec, who, idempotency_key)
    if created:
        return answer(task, 201)
    return JSONResponse(task, headers={"Idempotent-Replayed": "true"})


@router.get("", response_model=list[TaskOut])
async def list_tasks(
    who: Reader,
    svc: Svc,
    state: Annotated[list[str] | None, Query()] = None,
    name: str | None = None,
    kind: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
) -> Response:
    return await listing(svc, svc.tasks.list, who, state or [], name, kind, limit)


@router.get("/{ref}", response_model=TaskDetailOut)
async def get_task(ref: str, who: Reader, svc: Svc) -> JSONResponse:
    # a handful of reads (the task, its allocation and node, its events, its service):
    # on a worker thread, where a statement compiled for the first time costs no one
    return answer(await svc.slow(svc.tasks.detail, ref, who))


@router.get("/{ref}/events", response_model=list[EventOut])
async def task_events(ref: str, who: Reader, svc: Svc) -> JSONResponse:
    return answer(await svc.read(svc.tasks.events, ref, who))


@router.post("/{ref}/cancel", response_model=TaskOut)
async def cancel(ref: str, who: Submitter, svc: Svc) -> JSONResponse:
    return answer(await svc.write(svc.tasks.cancel, ref, who))


@router.get(
    "/{ref}/logs",
    response_class=PlainTextResponse,
    response_model=None,
    responses={
        200: {
            "content": {"text/plain": {}, "text/event-stream": {}},
            "headers": {
                "X-Log-Start": {
                    "description": "offset of the first byte sent (past `offset` "
                    "when the output there was dropped to keep the log to its cap)"
                },
                "X-Log-Next": {"description": "the offset to ask for next"},
            },
        }
    },
)
async def logs(
    ref: str,
    who: Reader,
    svc: Svc,
    follow: bool = False,
    offset: Annotated[int, Query(ge=0, le=1 << 62)] = 0,
    limit: Annotated[int, Query(ge=1, le=LOG_LIMIT_MAX)] = LOG_LIMIT_MAX,
) -> Response:
    """The task's output (stdout and stderr), up to `limit` bytes from `offset` (counted
    from the first byte the task wrote); with `follow`, server-sent events until the
    task ends."""
    if follow:  # whose task it is is settled before the stream starts: 404 otherwise
        task = await svc.read(svc.tasks.visible, ref, who)
        return StreamingResponse(svc.tasks.follow(task.id, offset), media_type="text/event-stream")
    start, data = await svc.slow(svc.tasks.log, ref, who, offset, limit)
    headers = {"X-Log-Start": str(start), "X-Log-Next": str(start + len(data))}
    return Response(data, media_type="text/plain; charset=utf-8", headers=headers)


@router.get("/{ref}/files", response_model=list[dict[str, Any]])
async def files(ref: str, who: Reader, svc: Svc, path: str = "") -> JSONResponse:
    """The entries of a folder of the task's work folder (its root by default): name,
    type, size, mtime. 404 for a path not there, through a link, or with '..'."""
    return answer(await svc.slow(svc.tasks.files, ref, who, path))


@router.get(
    "/{ref}/download",
    response_class=Response,
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "headers": {"X-File-Size": {"description": "the whole file's size"}},
        }
    },
)
async def download(
    ref: str,
    who: Reader,
    svc: Svc,
    path: str,
    offset: Annotated[int, Query(ge=0, le=1 << 62)] = 0,
    limit: Annotated[int, Query(ge=1, le=FILE_LIMIT_MAX)] = FILE_LIMIT_MAX,
) -> Response:
    """Up to `limit` bytes of a file of the task's work folder from `offset`."""
    size, data = await svc.slow(svc.tasks.download, ref, who, path, offset, limit)
    headers = {"X-File-Size": str(size), "X-File-Next": str(offset + len(data))}
    return Response(data, media_type="application/octet-stream", headers=headers)
