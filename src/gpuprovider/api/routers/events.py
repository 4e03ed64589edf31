"""/events: the journal, one feed of every transition of every aggregate the caller may
see (a tenant: its own tasks, services and leases; an admin: everything), by page or
as server-sent events that resume from a cursor."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from gpuprovider.api.deps import Reader, Services, Svc
from gpuprovider.api.routers import ERRORS, listing
from gpuprovider.api.schemas import EventsPageOut
from gpuprovider.api.sse import EventStream
from gpuprovider.domain.records import JournalRow
from gpuprovider.service.journal import PAGE_MAX, Follower, Scope, parse_cursor, scope_for

router = APIRouter(prefix="/events", tags=["events"], responses={**ERRORS, 400: ERRORS[404]})
KEEPALIVE_S = 15.0

Kinds = Annotated[
    list[str] | None, Query(description="task, node, service, lease, pipeline, stage")
]
Subject = Annotated[str | None, Query(alias="id", max_length=64, description="one aggregate")]
Tenant = Annotated[str | None, Query(max_length=64, description="admins: one tenant's rows")]
After = Annotated[str | None, Query(max_length=40, description="a cursor: rows after it")]


@router.get("", response_model=EventsPageOut)
async def page(
    who: Reader,
    svc: Svc,
    kind: Kinds = None,
    subject: Subject = None,
    tenant: Tenant = None,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    """Rows after `after`, oldest first, and `next`: the cursor to ask from next."""
    journal = svc.journal
    return await listing(svc, journal.page, who, kind or [], subject, tenant, after, limit)


@router.get(
    "/stream",
    response_model=None,
    responses={200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}},
)
async def stream(
    who: Reader,
    svc: Svc,
    kind: Kinds = None,
    subject: Subject = None,
    tenant: Tenant = None,
    after: After = None,
    last_event_id: Annotated[str | None, Header(max_length=40)] = None,
) -> EventStream:
    """Every row after the cursor (`after`, or the `Last-Event-ID` a reconnecting client
    sends), then each new one as it is committed; each event's id is its cursor. A
    client that falls too far behind gets `event: dropped` and resumes from its last
    id."""
    journal = svc.journal
    scope = scope_for(who, kind or [], subject, tenant)
    newest = await svc.read(journal.newest)
    cursor = parse_cursor(last_event_id or after, newest)
    follower = journal.follow(scope)  # before the backlog: nothing falls in between
    return EventStream(_events(svc, scope, cursor, follower))


def _event(row: JournalRow) -> str:
    return f"id: {row.id}\nevent: {row.kind}\ndata: {json.dumps(row.as_dict())}\n\n"


async def _events(
    svc: Services, scope: Scope, cursor: int, follower: Follower
) -> AsyncIterator[str]:
    journal = svc.journal
    try:
        rows: list[JournalRow] | None
        while True:  # the backlog, a page at a time
            rows = await svc.read(journal.backlog, scope, cursor)
            for row in rows:
                yield _event(row)
                cursor = row.id
            if len(rows) < PAGE_MAX:
                break
        yield ": following\n\n"
        while True:
            try:
                rows = await asyncio.wait_for(follower.next(), KEEPALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if rows is None:
                yield f"event: dropped\ndata: {json.dumps({'resume_after': str(cursor)})}\n\n"
                return
            for row in rows:
                if row.id > cursor:
                    yield _event(row)
                    cursor = row.id
    finally:
        journal.unfollow(follower)
