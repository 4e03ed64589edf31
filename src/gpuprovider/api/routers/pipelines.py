"""/pipelines: submit, list, inspect, pause, resume, cancel, signal, logs; and
/pipeline-batches: flush a batch stage by hand."""

from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse

from gpuprovider.api.deps import Reader, Submitter, Svc, optional
from gpuprovider.api.routers import ERRORS, answer, listing
from gpuprovider.api.schemas import FlushOut, PipelineDetailOut, PipelineOut
from gpuprovider.pipelines.spec import STAGE_NAME_PATTERN, PipelineSpec
from gpuprovider.service.pipelines import PipelineService

LOG_LIMIT_MAX = 4 << 20
Pipelines = Annotated[PipelineService, optional("pipelines", "pipelines")]
StageName = Annotated[str, Query(pattern=STAGE_NAME_PATTERN)]

router = APIRouter(prefix="/pipelines", tags=["pipelines"], responses=ERRORS)
batches = APIRouter(prefix="/pipeline-batches", tags=["pipelines"], responses=ERRORS)


@router.post("", status_code=201, response_model=PipelineOut)
async def submit(
    spec: PipelineSpec, who: Submitter, svc: Svc, pipelines: Pipelines
) -> JSONResponse:
    """A pipeline (`kind: pipeline`): refused with the field named when its stages form
    a cycle, name an unknown stage, set a limit out of range, or ask what no node has."""
    await svc.slow(pipelines.check, spec, who)  # may ask the container engine
    return answer(await svc.write(pipelines.submit, spec, who), 201)


@router.get("", response_model=list[PipelineOut])
async def list_pipelines(
    who: Reader,
    svc: Svc,
    pipelines: Pipelines,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> Response:
    return await listing(svc, pipelines.list, who, limit)


@router.get("/{ref}", response_model=PipelineDetailOut)
async def get_pipeline(ref: str, who: Reader, svc: Svc, pipelines: Pipelines) -> JSONResponse:
    return answer(await svc.read(pipelines.detail, ref, who))


@router.post("/{ref}/pause", response_model=PipelineOut)
async def pause(
    ref: str, who: Submitter, svc: Svc, pipelines: Pipelines, stop: bool = False
) -> JSONResponse:
    """Start no more stages; with `stop`, stop running ones (they run again on resume)."""
    return answer(await svc.write(pipelines.pause, ref, who, stop))


@router.post("/{ref}/resume", response_model=PipelineOut)
async def resume(
    ref: str,
    who: Submitter,
    svc: Svc,
    pipelines: Pipelines,
    from_stage: Annotated[str | None, Query(alias="from", pattern=STAGE_NAME_PATTERN)] = None,
) -> JSONResponse:
    """Run a paused pipeline again: its failed stages, or `from` a stage on."""
    return answer(await svc.write(pipelines.resume, ref, who, from_stage))


@router.post("/{ref}/cancel", response_model=PipelineOut)
async def cancel(ref: str, who: Submitter, svc: Svc, pipelines: Pipelines) -> JSONResponse:
    return answer(await svc.write(pipelines.cancel, ref, who))


@router.post("/{ref}/signal", response_model=PipelineOut)
async def signal(
    ref: str, stage: StageName, who: Submitter, svc: Svc, pipelines: Pipelines
) -> JSONResponse:
    """End a `wait: {signal: true}` stage."""
    return answer(await svc.write(pipelines.signal, ref, stage, who))


@router.get("/{ref}/logs", response_model=None)
async def logs(
    ref: str,
    stage: StageName,
    who: Reader,
    svc: Svc,
    pipelines: Pipelines,
    offset: Annotated[int, Query(ge=0, le=1 << 62)] = 0,
    limit: Annotated[int, Query(ge=1, le=LOG_LIMIT_MAX)] = LOG_LIMIT_MAX,
) -> Response:
    """The output of a stage's latest run."""
    task_id = await svc.read(pipelines.stage_task, ref, stage, who)
    start, data = await svc.slow(svc.tasks.log, task_id, who, offset, limit)
    headers = {"X-Log-Start": str(start), "X-Log-Next": str(start + len(data))}
    return Response(data, media_type="text/plain; charset=utf-8", headers=headers)


@batches.post("/{stage}/flush", response_model=FlushOut)
async def flush(stage: str, who: Submitter, svc: Svc, pipelines: Pipelines) -> JSONResponse:
    """Run the caller's pipelines waiting in batch stage `stage` now."""
    return answer(await svc.write(pipelines.flush, stage, who))
