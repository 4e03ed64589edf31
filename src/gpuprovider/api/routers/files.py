"""/uploads and /volumes: code in, state kept; a task's files are under /tasks."""

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import ClientDisconnect

from gpuprovider.api.deps import Reader, Submitter, Svc, UploadStore, VolumeStore
from gpuprovider.api.routers import ERRORS, answer
from gpuprovider.domain.spec import UPLOAD_PATTERN

router = APIRouter(tags=["files"], responses=ERRORS)
IDLE_S = 30.0  # an upload whose bytes stop for this long is dropped
UploadRef = Annotated[str, Path(pattern=UPLOAD_PATTERN.replace("^sha256:", "^(sha256:)?"))]


@router.get("/uploads", response_model=list[dict[str, Any]])
async def list_uploads(who: Reader, svc: Svc, uploads: UploadStore) -> JSONResponse:
    return answer(await svc.slow(uploads.list, who.tenant))


@router.get("/uploads/{ref}")
async def have_upload(ref: UploadRef, who: Reader, svc: Svc, uploads: UploadStore) -> JSONResponse:
    """200 when the tenant has this upload (it need not be sent again), 404 otherwise."""
    if not await svc.slow(uploads.have, who.tenant, ref):
        return answer({"error": f"no upload {ref}; send it with PUT"}, 404)
    return answer({"sha256": "sha256:" + ref.removeprefix("sha256:")})


@router.put(
    "/uploads/{ref}",
    status_code=201,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def put_upload(
    ref: UploadRef, request: Request, who: Submitter, svc: Svc, uploads: UploadStore
) -> JSONResponse:
    """A gzip-compressed tar of a folder, named by the SHA-256 of its bytes, with its
    Content-Length: checked (its hash, every entry, its unpacked size) before it is
    kept; nothing is kept of one refused or cut short (send it again)."""
    if await svc.slow(uploads.have, who.tenant, ref):
        return answer({"sha256": "sha256:" + ref.removeprefix("sha256:"), "kept": True})
    declared = request.headers.get("content-length", "")
    length = int(declared) if declared.isdigit() and len(declared) < 19 else None
    partial = await svc.slow(uploads.begin, who.tenant, ref, length)
    try:
        chunks = request.stream()
        while True:
            try:  # a client that stops sending holds its quota no longer than this
                chunk = await asyncio.wait_for(anext(chunks), IDLE_S)
            except StopAsyncIteration:
                break
            except (ClientDisconnect, TimeoutError):
                await asyncio.to_thread(partial.abort)
                return answer({"error": "upload: the bytes stopped coming; nothing was kept"}, 408)
            if chunk:
                await asyncio.to_thread(partial.write, chunk)
        kept = await svc.slow(partial.finish)
    except BaseException:
        await asyncio.to_thread(partial.abort)
        raise
    finally:
        uploads.done(who.tenant, partial.length)
    return answer(kept, 201)


@router.delete("/uploads/{ref}", status_code=204)
async def delete_upload(ref: UploadRef, who: Submitter, svc: Svc, uploads: UploadStore) -> None:
    await svc.slow(uploads.delete, who.tenant, ref)


class VolumeIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(max_length=300)
    size_mib: int = Field(ge=1, le=1 << 40)


@router.get("/volumes", response_model=list[dict[str, Any]])
async def list_volumes(who: Reader, svc: Svc, volumes: VolumeStore) -> JSONResponse:
    return answer(await svc.slow(volumes.list, who.tenant))


@router.post("/volumes", status_code=201)
async def create_volume(
    body: VolumeIn, who: Submitter, svc: Svc, volumes: VolumeStore
) -> JSONResponse:
    made = await svc.slow(volumes.create, who.tenant, body.name, body.size_mib << 20)
    return answer(made, 201)


@router.delete("/volumes/{name}", status_code=204)
async def delete_volume(name: str, who: Submitter, svc: Svc, volumes: VolumeStore) -> None:
    await svc.slow(volumes.delete, who.tenant, name)
