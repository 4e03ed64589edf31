"""The verifier's side over HTTP: challenge a provider's GPU, open, verify, report."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from gpuprovider.proof import calibration
from gpuprovider.proof.protocol import Params, params_for_memory
from gpuprovider.proof.prover import Commitment
from gpuprovider.proof.verifier import Verdict, new_challenge, pick_openings, verify

GIB = 2**30


class RemoteError(RuntimeError):
    """The provider could not be asked (unreachable, refused, wrong answer shape)."""


def params_for(memory_bytes: int) -> Params:
    """Full-size matrices for real GPU memories; small ones for the CPU prover's MiBs."""
    if memory_bytes >= GIB:
        return params_for_memory(memory_bytes)
    return params_for_memory(memory_bytes, n=64, m=16)


@dataclass
class Outcome:
    gpu_uuid: str
    model: str
    simulated: bool
    verdict: Verdict


class RemoteVerifier:
    def __init__(self, url: str, token: str | None, timeout_s: float = 600.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(
            base_url=url.rstrip("/") + "/api/v1", headers=headers, timeout=timeout_s
        )
        self.url = url
        self.bytes = 0

    def _call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        content = json.dumps(body).encode() if body is not None else None
        try:
            response = self.http.request(
                method, path, content=content, headers={"Content-Type": "application/json"}
            )
        except httpx.TransportError as exc:
            raise RemoteError(f"cannot reach {self.url}: {exc.__class__.__name__}") from None
        self.bytes += len(content or b"") + len(response.content)
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            raise RemoteError(f"{method} {path}: {response.status_code} {message}")
        return response

    def gpus(self) -> list[str]:
        return [g["uuid"] for g in self._call("GET", "/gpus").json() if g["present"]]

    def prove(self, uuid: str, expect_s: float | None = None) -> Outcome:
        self.bytes = 0
        info = self._call("GET", f"/gpus/{uuid}/proof").json()
        params = params_for(int(info["memory_bytes"]))
        challenge = new_challenge(uuid, info["provider_key"], params)
        t0 = time.perf_counter()
        answer = self._call("POST", f"/gpus/{uuid}/proof/challenge", challenge.to_dict()).json()
        elapsed = time.perf_counter() - t0
        wanted = pick_openings(params)
        body = {"challenge_id": challenge.id, "openings": [list(w) for w in wanted]}
        expectation = None
        try:
            commitment = Commitment.from_dict(answer, params)
            opened = self._call("POST", f"/gpus/{uuid}/proof/open", body).content
            expectation = None if info["simulated"] else calibration.expected(info["model"], params)
            if expect_s is None and expectation and expectation.measured:
                expect_s = expectation.seconds
            verdict = verify(challenge, commitment, wanted, opened, elapsed, expect_s)
        except Exception as exc:  # a malformed answer fails the proof, never the verifier
            verdict = Verdict(False, f"malformed answer: {exc}", {"elapsed_s": elapsed})
        verdict.figures["bytes_exchanged"] = self.bytes
        if expect_s is None:
            if info["simulated"]:
                why = "simulated GPU (CPU prover)"
            elif expectation:
                why = f"{expectation.source}, not measured"
            else:
                why = "no calibration for this model"
            verdict.figures["timing"] = f"not enforced: {why}"
        result = {"challenge_id": challenge.id, **verdict.to_dict()}
        try:
            self._call("POST", f"/gpus/{uuid}/proof/result", result)
        except RemoteError as exc:
            verdict.figures["not_recorded"] = str(exc)
        return Outcome(uuid, info["model"], info["simulated"], verdict)
