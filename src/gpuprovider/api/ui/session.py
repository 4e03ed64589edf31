"""Browser sessions of the dashboard: signing in with an API token, the session cookie
and the CSRF token of every action.

The cookie holds a random session id only (HttpOnly, SameSite=Strict, Secure under
TLS); the token it signed in with stays in this daemon's memory and is checked again
on every request, exactly as an API call's: a revoked or expired token ends the
session at once (within the token cache's few seconds on another daemon sharing the
store). A daemon restart ends every session (sign in again). Each session has its own
CSRF token, sent back with every action (a form field, or the X-CSRF-Token header that
htmx sends); an action without it, or with another, is refused with 403.
"""

from __future__ import annotations

import hmac
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from fastapi import Request

COOKIE = "gpp_session"
PRE_COOKIE = "gpp_signin"  # the sign-in form's own CSRF token (no session yet)
IDLE_S = 12 * 3600.0  # a session not used this long ends
MAX_SESSIONS = 10_000  # the oldest session ends first beyond this many
PREFIX = re.compile(r"^(/[A-Za-z0-9._~-]+)*$")


@dataclass
class Session:
    id: str
    authorization: str  # "Bearer <token>": never leaves this process
    csrf: str
    used_at: float = field(default_factory=time.monotonic)


class Sessions:
    def __init__(self) -> None:
        self._by_id: OrderedDict[str, Session] = OrderedDict()
        self._ended: OrderedDict[str, str] = OrderedDict()  # why recent sessions ended
        self._lock = threading.Lock()

    def open(self, token: str) -> Session:
        session = Session(secrets.token_urlsafe(32), f"Bearer {token}", secrets.token_urlsafe(32))
        with self._lock:
            self._by_id[session.id] = session
            while len(self._by_id) > MAX_SESSIONS:
                self._by_id.popitem(last=False)
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        with self._lock:
            session = self._by_id.get(session_id)
            if session is None:
                return None
            now = time.monotonic()
            if now - session.used_at > IDLE_S:
                del self._by_id[session_id]
                return None
            session.used_at = now
            self._by_id.move_to_end(session_id)
            return session

    def close(self, session_id: str | None) -> None:
        with self._lock:
            self._by_id.pop(session_id or "", None)

    def end(self, session_id: str, why: str) -> None:
        """End a session whose token no longer holds, remembering why for its browser."""
        with self._lock:
            if self._by_id.pop(session_id, None) is not None:
                self._ended[session_id] = why
                while len(self._ended) > 1000:
                    self._ended.popitem(last=False)

    def why_ended(self, session_id: str | None) -> str:
        with self._lock:
            return self._ended.get(session_id or "", "")

    def __len__(self) -> int:
        return len(self._by_id)


def same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def base_path(request: Request) -> str:
    """Where the dashboard is mounted as the browser sees it: the server's root path
    (uvicorn's --root-path) and a proxy's X-Forwarded-Prefix (the gateway's nginx puts
    the dashboard under a path), then /ui. A prefix that is not a plain path is
    ignored."""
    prefix = (request.scope.get("root_path") or "").rstrip("/")
    forwarded = request.headers.get("x-forwarded-prefix", "").rstrip("/")
    if forwarded and PREFIX.match(forwarded) and not prefix:
        prefix = forwarded
    if not PREFIX.match(prefix):
        prefix = ""
    return prefix + "/ui"


def secure(request: Request) -> bool:
    """Whether the browser reached us over TLS (directly, or through a proxy that says
    so): the cookie is then Secure."""
    proto = request.headers.get("x-forwarded-proto", "").lower()
    return request.url.scheme == "https" or proto == "https"
