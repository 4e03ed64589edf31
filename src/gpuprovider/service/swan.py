"""Swan's job API on this provider: jobs pushed by Swan's orchestrator become leases of
a push market (`[market.<name>] kind = "swan"`), priced, placed and run like any other.

Every request is checked before anything else is read or stored: its signature must be
the orchestrator's over this provider's account and node id, the subject, a nonce never
used before and an expiry at most a minute ahead. Only then is the space fetched, and only from
the hosts the operator allows, with a size limit and no redirects (a job cannot make
this provider fetch an address of the job's choosing).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ValidationError

from gpuprovider.market.connector import PushConnector
from gpuprovider.market.model import Action, Cause, LeaseState
from gpuprovider.market.swan import (
    DEPLOY_FILE,
    SIGNED_JOB_FIELDS,
    Freshness,
    Renewal,
    Space,
    SwanError,
    SwanJob,
    deploy_status,
    job_subject,
    ok,
    parse_deploy,
    signed_text,
    signer,
    to_order,
)
from gpuprovider.service.market import MarketService

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class SwanSettings:
    orchestrator: str  # the address whose signatures are obeyed (lowercase 0x...)
    cp_account: str  # this provider's account address on Swan, as signed
    node_id: str  # this provider's Swan node id, as signed
    token_price: float  # one Swan token in [pricing]'s currency
    source_hosts: frozenset[str]  # host[:port] a job's space may be fetched from
    max_source_bytes: int = 1 << 20
    fetch_timeout_s: float = 10.0


def parse(model: type[M], data: Any) -> M:
    """`data` as `model`, or SwanError naming the first wrong field."""
    if not isinstance(data, dict):
        raise SwanError(400, SwanError.JSON, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise SwanError(400, SwanError.BAD_PARAM, f"{where}: {message}") from None


class SwanService:
    def __init__(self, market: MarketService, settings: SwanSettings):
        if not isinstance(market.connector, PushConnector):
            raise TypeError("a Swan market needs a PushConnector")
        self.market, self.settings = market, settings
        self.connector: PushConnector = market.connector
        self.nonces = threading.Lock()  # a nonce is checked and recorded at once
        self.deciding = threading.Lock()  # one job decided at a time: its uuid, its GPUs
        self.http = httpx.Client(timeout=settings.fetch_timeout_s, follow_redirects=False)

    # -- checks -----------------------------------------------------------------------

    def _verify(
        self, subject: str, fresh: Freshness, signature: str, over: str = "the subject"
    ) -> None:
        """Signed by the orchestrator, unexpired, and never seen before (nonces are
        kept in the store until they expire: a replay after a restart is refused too)."""
        fresh.check(time.time())
        s = self.settings
        text = signed_text(s.cp_account, s.node_id, subject, fresh.nonce, fresh.expires_at)
        if signer(text, signature) != s.orchestrator:
            raise SwanError(
                401,
                SwanError.SIGNATURE,
                f"not signed by this provider's orchestrator over {over}, nonce and "
                "expires_at as sent: one of them was changed after signing, or another "
                "key signed it",
            )
        with self.nonces, self.market.store.tx() as tx:
            if not tx.market.use_nonce(self.market.market, fresh.nonce, fresh.expires_at):
                raise SwanError(
                    401, SwanError.SIGNATURE, "replayed request: this nonce was already used"
                )

    def _fetch(self, url: str, what: str) -> bytes:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SwanError(400, SwanError.SOURCE, f"{what} must be an http(s) URL")
        if parts.netloc.lower() not in self.settings.source_hosts:
            raise SwanError(
                400, SwanError.SOURCE, f"{what} is on {parts.netloc}, not an allowed source host"
            )
        limit = self.settings.max_source_bytes
        try:
            with self.http.stream("GET", url) as answer:
                if answer.status_code != 200:
                    raise SwanError(
                        502, SwanError.SOURCE, f"{what} answered HTTP {answer.status_code}"
                    )
                body = bytearray()
                for chunk in answer.iter_bytes():
                    body += chunk
                    if len(body) > limit:
                        raise SwanError(
                            400, SwanError.SOURCE, f"{what} is larger than {limit} bytes"
                        )
                return bytes(body)
        except httpx.HTTPError as exc:
            raise SwanError(
                502, SwanError.SOURCE, f"{what} could not be read: {type(exc).__name__}"
            ) from None

    def _space(self, url: str) -> tuple[Space, str]:
        raw = self._fetch(url, "job_source_uri")
        try:
            space = Space.model_validate(json.loads(raw))
        except (ValueError, ValidationError) as exc:
            raise SwanError(
                400, SwanError.SOURCE, f"job_source_uri is not a Swan space: {str(exc)[:300]}"
            ) from None
        files = [f for f in space.data.files if f.name.rsplit("/", 1)[-1] == DEPLOY_FILE]
        if len(files) != 1:
            raise SwanError(
                400,
                SwanError.SOURCE,
                f"the space must hold exactly one {DEPLOY_FILE} (image builds from a "
                "Dockerfile are not supported)",
            )
        text = self._fetch(files[0].url, DEPLOY_FILE).decode("utf-8", errors="replace")
        return space, text

    def _lease_id(self, job_uuid: str) -> str:
        return f"{self.market.market}.{job_uuid}"  # a label value: at most 32 + 1 + 48

    # -- the routes -------------------------------------------------------------------

    def receive(self, body: Any) -> dict[str, Any]:
        """A job from the orchestrator: checked, priced, placed and started, or refused
        with what and why (a refused job leaves a lost lease saying so, never a task)."""
        job = parse(SwanJob, body)
        self._verify(
            job_subject(job),
            job,
            job.node_id_job_source_uri_signature,
            over=", ".join(SIGNED_JOB_FIELDS),
        )
        lease_id = self._lease_id(job.uuid)
        if self.market.lease(lease_id):
            raise SwanError(409, SwanError.BAD_PARAM, f"job {job.uuid} was already received")
        space, deploy_text = self._space(job.job_source_uri)
        order = to_order(job, space, parse_deploy(deploy_text), self.settings.token_price)
        order = order.model_copy(update={"id": lease_id, "market": self.market.market})
        with self.deciding:
            decision, lease = self.market.accept_pushed(order)
        if lease is None:  # another request with this uuid got there first
            raise SwanError(409, SwanError.BAD_PARAM, f"job {job.uuid} was already received")
        if decision.action != Action.ACCEPT:
            code = SwanError.BELOW_PRICE if decision.cause == Cause.PRICE else None
            raise SwanError(400, code or SwanError.NO_RESOURCES, decision.reason)
        if lease.state == LeaseState.CLOSED:
            raise SwanError(500, SwanError.NO_RESOURCES, lease.reason)
        answer = job.model_dump(exclude={"nonce", "expires_at"})
        answer |= {
            "node_id_job_source_uri_signature": "",
            "job_real_uri": lease.endpoint,
            "job_result_uri": lease.endpoint,
            "price_per_hour": decision.price_per_hour,
        }
        return ok(answer)

    def cancel(self, query: dict[str, str]) -> dict[str, Any]:
        fresh = parse(Freshness, query)
        task_uuid = query.get("task_uuid", "")
        signature = query.get("node_id_task_uuid_signature", "")
        if not task_uuid or not signature:
            raise SwanError(
                400, SwanError.BAD_PARAM, "task_uuid and node_id_task_uuid_signature are required"
            )
        self._verify(task_uuid, fresh, signature, over="task_uuid")
        lease_id = self.market.labelled("swan-task", task_uuid)
        if lease_id is None:
            raise SwanError(404, SwanError.NOT_FOUND, f"no job of task {task_uuid}")
        self.market.on_close(lease_id, "tenant")
        return ok("deleted success")

    def renew(self, body: Any) -> dict[str, Any]:
        renewal = parse(Renewal, body)
        self._verify(
            f"{renewal.task_uuid}{renewal.duration}",
            renewal,
            renewal.signature,
            over="task_uuid, duration",
        )
        lease_id = self.market.labelled("swan-task", renewal.task_uuid)
        try:
            lease = self.market.renew(lease_id, renewal.duration) if lease_id else None
        except ValidationError:
            raise SwanError(400, SwanError.BAD_PARAM, "a job lasts at most 366 days") from None
        if lease is None:
            raise SwanError(404, SwanError.NOT_FOUND, f"no running job of task {renewal.task_uuid}")
        return ok("success")

    def status(self, job_uuid: str, query: dict[str, str]) -> dict[str, Any]:
        fresh = parse(Freshness, query)
        self._verify(job_uuid, fresh, query.get("signature", ""), over="the job uuid")
        lease = self.market.lease(self._lease_id(job_uuid))
        if lease is None:
            raise SwanError(404, SwanError.NOT_FOUND, f"no job {job_uuid}")
        return ok(
            {
                "job_uuid": job_uuid,
                "job_status": deploy_status(lease["state"]),
                "job_result_url": lease["endpoint"],
                "lease_state": lease["state"],
                "close_reason": lease["close_reason"],
                "reason": lease["reason"],
            }
        )

    def close(self) -> None:
        self.http.close()
