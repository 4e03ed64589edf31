"""The dashboard's pages under /ui: parse, authorise (the session's token, as the API
would), call a service, render. Live state comes from the journal's feed (/ui/events,
server-sent), on which htmx fetches again the part of a page that shows it; a task's
log comes by range, and live from the task's own follower."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, quote, urlencode

import jinja2
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError

from gpuprovider import __version__
from gpuprovider.api.deps import Services
from gpuprovider.api.schemas import TokenIn
from gpuprovider.api.sse import EventStream
from gpuprovider.api.ui.session import (
    COOKIE,
    PRE_COOKIE,
    Session,
    Sessions,
    base_path,
    same,
    secure,
)
from gpuprovider.domain.records import JournalRow, TokenRecord
from gpuprovider.service.errors import Forbidden, ServiceError, Unauthenticated
from gpuprovider.service.journal import Follower, Scope, scope_for
from gpuprovider.service.tokens import TokenService

HERE = Path(__file__).parent
LOG_TAIL = 64 << 10  # bytes of a task's log shown when its page opens
LOG_DOWNLOAD_MAX = 4 << 20  # bytes of a task's log in one download
KEEPALIVE_S = 15.0
FORM_MAX = 64 << 10
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'; object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

router = APIRouter(prefix="/ui", include_in_schema=False)


class SignInNeeded(Exception):
    """No session, or one whose token no longer holds: back to the sign-in page."""


# -- rendering --------------------------------------------------------------------------


def _ago(at: float | None) -> str:
    if at is None:
        return "—"
    seconds = time.time() - at
    if seconds < 0:
        return "in " + _span(-seconds)
    return _span(seconds) + " ago"


def _span(seconds: float) -> str:
    for size, unit in ((86_400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _utc(at: float | None) -> str:
    if at is None:
        return ""
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _iso(at: float | None) -> str:
    return "" if at is None else dt.datetime.fromtimestamp(at, dt.UTC).isoformat()


def _mib(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value / 1024:.1f} GiB" if value >= 1024 else f"{value:.0f} MiB"


templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,  # every value a tenant wrote (names, commands, logs) is escaped
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.filters.update(ago=_ago, utc=_utc, iso=_iso, mib=_mib)


async def render(
    request: Request,
    name: str,
    status: int = 200,
    session: Session | None = None,
    who: TokenRecord | None = None,
    **context: Any,
) -> HTMLResponse:
    # on a worker thread: a long page (a task's log tail, fifty tasks) never holds the loop
    html = await asyncio.to_thread(
        templates.get_template(name).render,
        base=base_path(request),
        version=__version__,
        who=who,
        csrf=session.csrf if session else "",
        here=_here(request),
        now=time.time(),
        **context,
    )
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def _here(request: Request) -> str:
    """This page's address as the browser sees it (under the prefix it came by)."""
    path = request.url.path
    at = path.find("/ui")
    rest = path[at + 3 :] if at >= 0 else ""
    query = request.url.query
    return base_path(request) + rest + (f"?{query}" if query else "")


async def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    """A refusal as a page (403, 404, 409, ...): what was wrong, and a way back."""
    return await render(request, "error.html", status, message=message, status_code=status)


def is_ui(scope: Mapping[str, Any]) -> bool:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path == "/ui" or path.startswith("/ui/")


# -- who is asking ------------------------------------------------------------------------


def _services(request: Request) -> Services:
    return request.app.state.services


def _sessions(request: Request) -> Sessions:
    return request.app.state.ui_sessions


async def viewer(request: Request) -> tuple[Session, TokenRecord]:
    """The session of the request and the token it holds, checked now."""
    sessions = _sessions(request)
    session = sessions.get(request.cookies.get(COOKIE))
    if session is None:
        raise SignInNeeded()
    svc = _services(request)
    try:
        who = svc.tokens.cached(session.authorization)
        if who is None:
            who = await svc.read(svc.tokens.authenticate, session.authorization)
    except Unauthenticated as exc:  # revoked or expired: the session ends with it
        sessions.end(session.id, f"signed out: {exc}")
        raise SignInNeeded(f"signed out: {exc}") from None
    TokenService.require(who, "read")
    return session, who


Viewer = Annotated[tuple[Session, TokenRecord], Depends(viewer)]


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form (the only kind these pages send), first value of each field."""
    body = await request.body()
    if len(body) > FORM_MAX:
        raise Forbidden("the form is larger than any this dashboard sends")
    fields = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {key: values[0] for key, values in fields.items()}


async def actor(request: Request) -> tuple[Session, TokenRecord, dict[str, str]]:
    """For an action: the viewer, whose request carries the session's CSRF token."""
    session, who = await viewer(request)
    form = await _form(request)
    if not same(request.headers.get("x-csrf-token") or form.get("csrf"), session.csrf):
        raise Forbidden("the form's CSRF token is missing or wrong: reload the page and try again")
    return session, who, form


Actor = Annotated[tuple[Session, TokenRecord, dict[str, str]], Depends(actor)]


def _back(request: Request, where: str) -> Response:
    """After an action: htmx is told where to go; a plain form post is redirected."""
    url = base_path(request) + where
    if request.headers.get("hx-request"):
        return Response(status_code=204, headers={"HX-Location": url})
    return RedirectResponse(url, status_code=303)


# -- sign in and out ------------------------------------------------------------------------


@router.get("/signin")
async def signin_page(request: Request) -> Response:
    # why a session ended comes from the daemon's memory, never from the address (a
    # link cannot put words on this page)
    why = _sessions(request).why_ended(request.cookies.get(COOKIE))
    pre = request.cookies.get(PRE_COOKIE) or secrets.token_urlsafe(32)
    response = await render(request, "signin.html", why=why, pre=pre)
    _set_cookie(request, response, PRE_COOKIE, pre, 600)
    return response


@router.post("/signin")
async def signin(request: Request) -> Response:
    form = await _form(request)
    pre = request.cookies.get(PRE_COOKIE)
    if not pre or not same(form.get("csrf"), pre):
        raise Forbidden("the sign-in form's CSRF token is missing or wrong: reload the page")
    token = form.get("token", "").strip()
    svc = _services(request)
    try:
        who = await svc.read(svc.tokens.authenticate, f"Bearer {token}")
        TokenService.require(who, "read")
    except (Unauthenticated, Forbidden) as exc:
        response = await render(request, "signin.html", 401, why=str(exc), pre=pre)
        return response
    session = _sessions(request).open(token)
    redirect = RedirectResponse(base_path(request) + "/", status_code=303)
    _set_cookie(request, redirect, COOKIE, session.id, None)
    redirect.delete_cookie(PRE_COOKIE, path=base_path(request))
    return redirect


@router.post("/signout")
async def signout(request: Request, acting: Actor) -> Response:
    session, _, _ = acting
    _sessions(request).close(session.id)
    response = RedirectResponse(base_path(request) + "/signin", status_code=303)
    response.delete_cookie(COOKIE, path=base_path(request))
    return response


def _set_cookie(
    request: Request, response: Response, name: str, value: str, max_age: int | None
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=base_path(request),
        httponly=True,
        samesite="strict",
        secure=secure(request),
    )


# -- overview --------------------------------------------------------------------------------


@router.get("/")
async def overview(request: Request, viewing: Viewer) -> Response:
    session, who = viewing
    svc = _services(request)
    assert svc.dashboard is not None
    figures = await svc.slow(svc.dashboard.overview, who)
    usage, actions = [], []
    if svc.repair is not None:  # booked and idle GPU-hours (a tenant: its own), repairs
        usage = await svc.read(svc.repair.accounting, who, 7)
        if who.is_admin:
            actions = await svc.read(svc.repair.events, None, None, 10)
    return await render(
        request,
        "overview.html",
        session=session,
        who=who,
        o=figures,
        usage=usage,
        actions=actions,
    )


@router.get("")
async def overview_bare(request: Request) -> Response:
    return RedirectResponse(base_path(request) + "/", status_code=307)


# -- tasks -------------------------------------------------------------------------------


@router.get("/tasks")
async def tasks(
    request: Request,
    viewing: Viewer,
    state: Annotated[str, Query(max_length=20)] = "",
    name: Annotated[str, Query(max_length=128)] = "",
    tenant: Annotated[str, Query(max_length=64)] = "",
    before: Annotated[str, Query(max_length=100)] = "",
) -> Response:
    session, who = viewing
    svc = _services(request)
    assert svc.dashboard is not None
    page = await svc.read(svc.dashboard.tasks, who, state, name, tenant, before)
    filters = {"state": state, "name": name, "tenant": tenant}
    more = urlencode({**filters, "before": page["next"]}) if page["next"] else None
    return await render(
        request,
        "tasks.html",
        session=session,
        who=who,
        page=page,
        filters=filters,
        more=more,
        states=[s for s in ("queued", "running", "succeeded", "failed", "cancelled")],
    )


@router.get("/tasks/{ref}")
async def task(request: Request, ref: str, viewing: Viewer) -> Response:
    session, who = viewing
    svc = _services(request)
    detail = await svc.read(svc.tasks.detail, ref, who)
    start, data = await svc.slow(svc.tasks.log, detail["id"], who, -LOG_TAIL, LOG_TAIL)
    start = max(start, 0)  # no output yet: it starts at 0
    return await render(
        request,
        "task.html",
        session=session,
        who=who,
        t=detail,
        log_start=start,
        log_next=start + len(data),
        log_text=data.decode("utf-8", errors="replace"),
        spec_json=json.dumps(detail["spec"], indent=2, sort_keys=True),
        live=detail["state"] not in ("succeeded", "failed", "cancelled", "expired"),
    )


@router.post("/tasks/{ref}/cancel")
async def cancel(request: Request, ref: str, acting: Actor) -> Response:
    _, who, _ = acting
    svc = _services(request)
    TokenService.require(who, "submit")
    task = await svc.write(svc.tasks.cancel, ref, who)
    return _back(request, f"/tasks/{quote(task['id'])}")


@router.get("/tasks/{ref}/log.txt")
async def log_download(
    request: Request,
    ref: str,
    viewing: Viewer,
    offset: Annotated[int, Query(ge=-LOG_DOWNLOAD_MAX, le=1 << 62)] = -LOG_DOWNLOAD_MAX,
    limit: Annotated[int, Query(ge=1, le=LOG_DOWNLOAD_MAX)] = LOG_DOWNLOAD_MAX,
) -> Response:
    """A range of the task's output, as a file (never the whole of a huge log at once:
    `offset` from the start, or from the end when negative)."""
    _, who = viewing
    svc = _services(request)
    task = await svc.read(svc.tasks.visible, ref, who)
    start, data = await svc.slow(svc.tasks.log, task.id, who, offset, limit)
    headers = {
        **SECURITY_HEADERS,
        "Content-Disposition": f'attachment; filename="{task.id}-{start}.log"',
        "X-Log-Start": str(start),
        "X-Log-Next": str(start + len(data)),
    }
    return Response(data, media_type="application/octet-stream", headers=headers)


@router.get("/tasks/{ref}/log/stream")
async def log_stream(
    request: Request,
    ref: str,
    viewing: Viewer,
    offset: Annotated[int, Query(ge=0, le=1 << 62)] = 0,
) -> Response:
    svc = _services(request)
    session, who = viewing
    task = await svc.read(svc.tasks.visible, ref, who)  # another tenant's: 404 here
    chunks = svc.tasks.follow(task.id, offset)
    return EventStream(_log(svc, session, _sessions(request), chunks))


async def _log(
    svc: Services, session: Session, sessions: Sessions, chunks: AsyncIterator[str]
) -> AsyncIterator[str]:
    """The task's output as it comes, while the session's token holds."""
    try:
        async for chunk in chunks:
            if not await _still_valid(svc, session, sessions):
                yield "event: signedout\ndata: {}\n\n"
                return
            yield chunk
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


# -- nodes -------------------------------------------------------------------------------


@router.get("/nodes")
async def nodes(request: Request, viewing: Viewer) -> Response:
    session, who = viewing
    svc = _services(request)
    listed = await svc.read(svc.nodes.list)
    return await render(request, "nodes.html", session=session, who=who, nodes=listed)


@router.get("/nodes/{ref}")
async def node(request: Request, ref: str, viewing: Viewer) -> Response:
    session, who = viewing
    svc = _services(request)
    assert svc.dashboard is not None
    view = await svc.read(svc.dashboard.node, ref)
    samples = svc.repair.samples() if svc.repair else {}
    allowed = None
    if not who.is_admin:  # a tenant sees its own tasks on a GPU only
        allowed = {t for g in await svc.read(svc.nodes.gpus, who) for t in g["tasks"]}
    for gpu in view["gpus"]:
        state = samples.get(gpu["uuid"])
        gpu["sample"] = state.sample if state else None
        if allowed is not None:
            gpu["tasks"] = [t for t in gpu["tasks"] if t in allowed]
    return await render(
        request,
        "node.html",
        session=session,
        who=who,
        n=view,
        charts=svc.repair is not None,
    )


@router.post("/nodes/{ref}/{action}")
async def node_action(request: Request, ref: str, action: str, acting: Actor) -> Response:
    _, who, form = acting
    svc = _services(request)
    TokenService.require(who, "admin")
    if action == "cordon":
        done = await svc.write(svc.nodes.cordon, ref, who, form.get("reason", "")[:200])
    elif action == "resume":
        done = await svc.write(svc.nodes.resume, ref, who)
    elif action == "drain":
        done = await svc.write(svc.nodes.drain, ref, who)
    else:
        return await error_page(request, 404, f"no action {action[:40]!r}: cordon, resume or drain")
    return _back(request, f"/nodes/{quote(ref)}" if done else "/nodes")


@router.get("/gpus/{uuid}/history")
async def gpu_history(request: Request, uuid: str, viewing: Viewer) -> Response:
    svc = _services(request)
    if svc.repair is None:
        return JSONResponse({"points": []}, headers=SECURITY_HEADERS)
    return JSONResponse(await svc.read(svc.repair.gpu_history, uuid), headers=SECURITY_HEADERS)


# -- services ---------------------------------------------------------------------------


@router.get("/services")
async def services_page(request: Request, viewing: Viewer) -> Response:
    session, who = viewing
    svc = _services(request)
    listed = await svc.read(svc.serving.list, who) if svc.serving else []
    return await render(
        request,
        "services.html",
        session=session,
        who=who,
        services=listed,
        served=bool(svc.serving),
    )


@router.get("/services/{ref}")
async def service_page(request: Request, ref: str, viewing: Viewer) -> Response:
    session, who = viewing
    svc = _services(request)
    if svc.serving is None:
        return await error_page(request, 404, "this provider serves no services")
    view = await svc.read(svc.serving.get, ref, who)  # another tenant's: 404
    return await render(request, "service.html", session=session, who=who, s=view)


# -- accounting ---------------------------------------------------------------------------------

ACCOUNTING_DAYS = (7, 14, 31)


@router.get("/accounting")
async def accounting(
    request: Request, viewing: Viewer, days: Annotated[int, Query(ge=1, le=366)] = 7
) -> Response:
    """Booked and idle GPU-hours per tenant and model (a tenant: its own)."""
    session, who = viewing
    svc = _services(request)
    rows = await svc.read(svc.repair.accounting, who, days) if svc.repair else []
    return await render(
        request,
        "accounting.html",
        session=session,
        who=who,
        rows=rows,
        days=days,
        choices=ACCOUNTING_DAYS,
    )


@router.get("/accounting.csv")
async def accounting_csv(
    request: Request, viewing: Viewer, days: Annotated[int, Query(ge=1, le=366)] = 7
) -> Response:
    _, who = viewing
    svc = _services(request)
    rows = await svc.read(svc.repair.accounting, who, days) if svc.repair else []
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["tenant", "gpu_model", "booked_gpu_hours", "idle_gpu_hours", "idle_ratio"])
    for row in rows:
        writer.writerow(
            [
                _csv_cell(row["tenant"]),
                _csv_cell(row["model"]),
                f"{row['booked_gpu_hours']:.4f}",
                f"{row['idle_gpu_hours']:.4f}",
                f"{row['idle_ratio']:.4f}",
            ]
        )
    headers = {
        **SECURITY_HEADERS,
        "Content-Disposition": f'attachment; filename="gpu-hours-{days}d.csv"',
    }
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8", headers=headers)


def _csv_cell(text: str) -> str:
    """A name as a spreadsheet will not run it (a cell starting =, +, - or @ is a
    formula there)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


# -- market (admins) -------------------------------------------------------------------------


@router.get("/market")
async def market_page(request: Request, viewing: Viewer) -> Response:
    session, who = viewing
    TokenService.require(who, "admin")
    svc = _services(request)
    assert svc.dashboard is not None
    markets = await svc.slow(svc.dashboard.markets_view)
    return await render(request, "market.html", session=session, who=who, markets=markets)


# -- tokens (admins) ----------------------------------------------------------------------


@router.get("/tokens")
async def tokens(request: Request, viewing: Viewer) -> Response:
    session, who = viewing
    TokenService.require(who, "admin")
    svc = _services(request)
    listed = await svc.read(svc.tokens.list)
    return await render(request, "tokens.html", session=session, who=who, tokens=listed, made=None)


@router.post("/tokens")
async def token_create(request: Request, acting: Actor) -> Response:
    session, who, form = acting
    TokenService.require(who, "admin")
    svc = _services(request)
    scopes = [s for s in ("read", "submit", "admin", "metrics") if form.get(f"scope_{s}")]
    try:  # the API's own model: the same names and scopes, the same messages
        asked = TokenIn(
            name=form.get("name", "").strip(),
            scopes=scopes,
            tenant=form.get("tenant", "").strip() or None,
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return await error_page(request, 422, problems)
    made = await svc.write(svc.tokens.create, asked.name, asked.scopes, asked.tenant)
    listed = await svc.read(svc.tokens.list)
    return await render(
        request, "tokens.html", 201, session=session, who=who, tokens=listed, made=made
    )


@router.post("/tokens/{name}/revoke")
async def token_revoke(request: Request, name: str, acting: Actor) -> Response:
    _, who, _ = acting
    TokenService.require(who, "admin")
    svc = _services(request)
    await svc.write(svc.tokens.revoke, name)
    return _back(request, "/tokens")


# -- the live feed ----------------------------------------------------------------------------


@router.get("/events")
async def events(
    request: Request,
    viewing: Viewer,
    kind: Annotated[str, Query(max_length=20)] = "",
    subject: Annotated[str, Query(alias="id", max_length=64)] = "",
) -> Response:
    """The journal rows the viewer may see, from now on (the page shows what was before
    it): each one tells the page to fetch its live parts again."""
    session, who = viewing
    svc = _services(request)
    scope = scope_for(who, [kind] if kind else [], subject or None, None)
    follower = svc.journal.follow(scope)
    return EventStream(_journal(request, svc, session, follower, scope))


async def _journal(
    request: Request, svc: Services, session: Session, follower: Follower, scope: Scope
) -> AsyncIterator[str]:
    sessions = _sessions(request)
    try:
        yield ": following\n\n"
        while True:
            try:
                rows = await _next(follower)
            except TimeoutError:
                rows = []
            if sessions.get(session.id) is None or not await _still_valid(svc, session, sessions):
                yield "event: signedout\ndata: {}\n\n"
                return
            if rows is None:
                yield "event: dropped\ndata: {}\n\n"
                return
            if not rows:
                yield ": keep-alive\n\n"
                continue
            yield _row(rows[-1])
    finally:
        svc.journal.unfollow(follower)


async def _next(follower: Follower) -> list[JournalRow] | None:
    return await asyncio.wait_for(follower.next(), KEEPALIVE_S)


async def _still_valid(svc: Services, session: Session, sessions: Sessions) -> bool:
    """Whether the session's token still holds (the token cache first: a store read
    at most every few seconds; a revocation drops the cache entry at once); if not,
    the session ends."""
    try:
        if svc.tokens.cached(session.authorization) is not None:
            return True
        await svc.read(svc.tokens.authenticate, session.authorization)
        return True
    except Unauthenticated as exc:
        sessions.end(session.id, f"signed out: {exc}")
        return False


def _row(row: JournalRow) -> str:
    brief = {"kind": row.kind, "id": row.subject}
    return f"id: {row.id}\nevent: change\ndata: {json.dumps(brief)}\n\n"


# -- wiring --------------------------------------------------------------------------------


def install(app: FastAPI) -> None:
    """Serve the dashboard on `app`: its pages, its vendored assets, its sessions."""
    app.state.ui_sessions = Sessions()
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")

    @app.exception_handler(SignInNeeded)
    async def _sign_in(request: Request, exc: SignInNeeded) -> Response:
        url = base_path(request) + "/signin"  # which says why, from the session's record
        if request.headers.get("hx-request"):
            return Response(status_code=401, headers={"HX-Redirect": url})
        if request.headers.get("accept", "").startswith("text/event-stream"):
            return Response("event: signedout\ndata: {}\n\n", 401, media_type="text/event-stream")
        return RedirectResponse(url, status_code=303)


async def refused(request: Request, exc: ServiceError) -> HTMLResponse:
    return await error_page(request, exc.status, str(exc))
