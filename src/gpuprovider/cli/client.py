"""The CLI's HTTP client: URL and token from the home unless given."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from gpuprovider.config import ConfigError, load_config
from gpuprovider.home import Home

SUBMIT_TRIES = 3


class CliError(Exception):
    """Ends the command with a message and an exit code (1 failure, 2 bad input)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class Unreachable(CliError):
    """No provider answers at the URL."""


def resolve_endpoint(home: Home, url: str | None, token: str | None) -> tuple[str, str | None]:
    url = url or os.environ.get("GPUPROVIDER_URL")
    token = token or os.environ.get("GPUPROVIDER_TOKEN")
    if not url:
        try:
            api = load_config(home.config).api
        except ConfigError as exc:
            raise CliError(f"{exc}\n(or pass --url)", 2) from None
        url = f"http://{api.host}:{api.port}"
    if not token and home.token.exists():
        token = home.token.read_text().strip()
    return url.rstrip("/"), token


class Client:
    def __init__(self, url: str, token: str | None, timeout_s: float = 30.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout_s)

    def _check(self, response: httpx.Response) -> Any:
        if response.status_code < 400:
            if not response.content:
                return None
            if response.headers.get("content-type", "").startswith("application/json"):
                return response.json()
            return response.text
        try:
            message = response.json().get("error") or response.text
        except ValueError:
            message = response.text
        # 4xx: the request was wrong (bad input, auth); 5xx: the provider failed.
        raise CliError(message, 2 if response.status_code < 500 else 1)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._check(self.response(method, path, **kwargs))

    def response(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The provider's whole answer (headers and bytes); CliError when it says no."""
        try:
            response = self.http.request(method, f"/api/v1{path}", **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        self._check(response)
        return response

    def _unreachable(self, exc: Exception) -> Unreachable:
        return Unreachable(
            f"cannot reach the provider at {self.url} ({exc.__class__.__name__}); "
            "is `gpuprovider up` running?"
        )

    def submit(self, spec: dict[str, Any]) -> Any:
        """POST /tasks under an Idempotency-Key of its own, sent again with the same key
        when the connection drops after the request went out: the provider makes the
        task once, however many times it is sent."""
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        for attempt in range(SUBMIT_TRIES):
            try:
                response = self.http.post("/api/v1/tasks", json=spec, headers=headers)
            except httpx.ConnectError as exc:  # never reached the provider
                raise self._unreachable(exc) from None
            except httpx.TransportError as exc:
                if attempt + 1 == SUBMIT_TRIES:
                    raise self._unreachable(exc) from None
                time.sleep(0.5 * (attempt + 1))
                continue
            return self._check(response)

    def response_or_none(self, method: str, path: str) -> httpx.Response | None:
        """The answer, or None for a 404."""
        try:
            response = self.http.request(method, f"/api/v1{path}")
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if response.status_code == 404:
            return None
        self._check(response)
        return response

    def put_file(self, path: str, file: Path, tries: int) -> Any:
        """PUT a file's bytes (streamed, with its length), sent again whole when the
        connection drops: the provider keeps nothing of a cut upload."""
        for attempt in range(tries):
            try:
                with open(file, "rb") as body:
                    size = os.fstat(body.fileno()).st_size
                    headers = {
                        "Content-Length": str(size),
                        "Content-Type": "application/octet-stream",
                    }
                    response = self.http.put(
                        f"/api/v1{path}", content=body, headers=headers, timeout=600
                    )
            except httpx.ConnectError as exc:
                raise self._unreachable(exc) from None
            except httpx.TransportError as exc:
                if attempt + 1 == tries:
                    raise self._unreachable(exc) from None
                time.sleep(0.5 * (attempt + 1))
                continue
            return self._check(response)

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any = None, **params: Any) -> Any:
        return self.request("POST", path, json=body, params=params or None)

    def stream_events(self, path: str, **params: Any) -> Iterator[tuple[str, Any]]:
        """Server-sent events as (event, data) pairs."""
        for event, data, _ in self.stream_with_ids(path, **params):
            yield event, data

    def stream_with_ids(self, path: str, **params: Any) -> Iterator[tuple[str, Any, str]]:
        """Server-sent events as (event, data, id) triples."""
        try:
            with self.http.stream("GET", f"/api/v1{path}", params=params, timeout=None) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self._check(resp)
                event, data, ident = "message", None, ""
                for line in resp.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data = json.loads(line[5:].strip())
                    elif line.startswith("id:"):
                        ident = line[3:].strip()
                    elif line == "" and data is not None:
                        yield event, data, ident
                        event, data, ident = "message", None, ""
        except httpx.TransportError as exc:
            raise CliError(f"lost the provider at {self.url} ({exc.__class__.__name__})") from None
