"""The verifier's side over HTTP: challenge every GPU of a provider at once, time the
walks together, open, verify, sign and report.

Nothing the provider says is believed beyond what the protocol checks: the node key
is pinned by the caller, memory sizes come from the catalogue, every field of every
answer is validated, openings are read no further than their expected length, and a
GPU whose provider misbehaves fails on its own while the others are still checked.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from gpuprovider.domain import catalogue
from gpuprovider.proof import bounds, calibration
from gpuprovider.proof.protocol import Challenge, Params, params_for_memory
from gpuprovider.proof.prover import Commitment
from gpuprovider.proof.verifier import (
    Verdict,
    new_challenge,
    new_nonce,
    pick_openings,
    sign_verdict,
    verify,
)

GIB = 2**30
MAX_SIMULATED_BYTES = 4 * GIB  # a simulated GPU proves host memory with the CPU prover
MAX_JSON_BYTES = 16 << 20  # no answer but the openings is larger


class RemoteError(RuntimeError):
    """The provider could not be asked (unreachable, refused, wrong answer shape)."""


def gpu_params(memory_bytes: int, rounds: int = bounds.ROUNDS_MIN) -> Params:
    """A GPU's challenge: 1 MiB matrices, 1,024 rows reading 16 each per step (16 GiB a
    step: the host's Merkle root of each 1 MiB state stays small next to it), each matrix
    read 32 times; `rounds` from `bounds.rounds_for(model)`."""
    return params_for_memory(memory_bytes, n=1024, m=1024, per_step=16, uses=32, rounds=rounds)


def cpu_params(memory_bytes: int) -> Params:
    """A simulated GPU's (the CPU prover's MiBs): 64 KiB matrices, 128 rows reading 4,
    each matrix read 32 times; 256 rounds make a word ~128x dearer than reading it on a
    CPU core (measured: bench/proof.py)."""
    return params_for_memory(memory_bytes, n=256, m=128, per_step=4, uses=32, rounds=256)


def model_params(model: catalogue.GpuModel) -> Params:
    """What a verifier asks of a real GPU of `model`: 90 % of the catalogue's memory, the
    rounds its compute and bandwidth call for."""
    return gpu_params(model.memory_gb * GIB, bounds.rounds_for(model))


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore")


class GpuListed(_Answer):
    uuid: Annotated[str, Field(min_length=1, max_length=96)]
    model: Annotated[str, Field(max_length=64)]
    present: StrictBool


class ProofInfo(_Answer):
    gpu_uuid: Annotated[str, Field(max_length=96)]
    model: Annotated[str, Field(max_length=64)]
    simulated: StrictBool
    memory_bytes: Annotated[StrictInt, Field(ge=0, le=1 << 50)]
    provider_key: Annotated[str, Field(max_length=64)]


class Filled(_Answer):
    challenge_id: Annotated[str, Field(max_length=64)]


@dataclass
class Outcome:
    gpu_uuid: str
    model: str
    simulated: bool
    verdict: Verdict
    stored: bool = False


class RemoteVerifier:
    def __init__(
        self,
        url: str,
        token: str | None,
        provider_key: str,
        signer: Ed25519PrivateKey,
        timeout_s: float = 900.0,
    ):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(
            base_url=url.rstrip("/") + "/api/v1", headers=headers, timeout=timeout_s
        )
        self.url, self.provider_key, self.signer = url, provider_key.lower(), signer
        self._bytes: dict[str, int] = {}
        self._lock = threading.Lock()

    def _count(self, uuid: str, size: int) -> None:
        with self._lock:
            self._bytes[uuid] = self._bytes.get(uuid, 0) + size

    def _call(self, method: str, path: str, body: Any = None, uuid: str = "", limit: int = 0):
        """One request; the answer's bytes (at most `limit`, else MAX_JSON_BYTES)."""
        content = json.dumps(body).encode() if body is not None else None
        limit = limit or MAX_JSON_BYTES
        try:
            with self.http.stream(
                method, path, content=content, headers={"Content-Type": "application/json"}
            ) as response:
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limit:
                    raise RemoteError(f"{method} {path}: answer of {declared} bytes; limit {limit}")
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > limit:
                        raise RemoteError(f"{method} {path}: answer over {limit} bytes")
        except httpx.TransportError as exc:
            raise RemoteError(f"cannot reach {self.url}: {exc.__class__.__name__}") from None
        self._count(uuid, len(content or b"") + len(data))
        if response.status_code >= 400:
            # only a gpuprovider API's own error is repeated: whatever else answers at
            # that URL (the hub proves URLs providers give it) stays unread
            try:
                message = json.loads(data).get("error")
            except (ValueError, AttributeError):
                message = None
            shown = message[:300] if isinstance(message, str) else "(not a gpuprovider answer)"
            raise RemoteError(f"{method} {path}: {response.status_code} {shown}")
        return bytes(data)

    def _json(self, method: str, path: str, body: Any = None, uuid: str = "") -> Any:
        data = self._call(method, path, body, uuid)
        try:
            return json.loads(data)
        except ValueError:
            raise RemoteError(f"{method} {path}: the answer is not JSON") from None

    def gpus(self) -> list[str]:
        """The provider's present GPUs (a malformed list is an error, not a crash)."""
        raw = self._json("GET", "/gpus")
        try:
            listed = [GpuListed.model_validate(g) for g in raw]
        except (ValidationError, TypeError) as exc:
            raise RemoteError(f"GET /gpus: not a list of GPUs ({_first(exc)})") from None
        return [g.uuid for g in listed if g.present]

    def prove_all(self, uuids: list[str], expect_s: float | None = None) -> list[Outcome]:
        """Prove every GPU at once: fills in parallel, then every walk started together
        and timed on its own, so one device cannot answer for several in turn."""
        if not uuids:
            return []
        starting = threading.Barrier(len(uuids), timeout=self.http.timeout.read)
        with ThreadPoolExecutor(max_workers=len(uuids)) as pool:
            return list(pool.map(lambda u: self._prove(u, expect_s, starting), uuids))

    def _prove(self, uuid: str, expect_s: float | None, starting: threading.Barrier) -> Outcome:
        model, simulated = "?", False
        challenge: Challenge | None = None
        try:
            try:
                info = ProofInfo.model_validate(self._json("GET", f"/gpus/{uuid}/proof", uuid=uuid))
            except ValidationError as exc:
                raise RemoteError(f"malformed proof info: {_first(exc)}") from None
            model, simulated = info.model, info.simulated
            if info.gpu_uuid != uuid:
                raise RemoteError(f"asked about {uuid}, the provider answered for {info.gpu_uuid}")
            if info.provider_key.lower() != self.provider_key:
                raise RemoteError(
                    "the provider answers with another node key than the pinned one: "
                    "a different machine, or a key that changed"
                )
            challenge = new_challenge(uuid, model, self.provider_key, self._params(info))
            body = challenge.to_dict()
            try:
                filled = Filled.model_validate(
                    self._json("POST", f"/gpus/{uuid}/proof/challenge", body, uuid)
                )
            except ValidationError as exc:
                raise RemoteError(f"malformed fill answer: {_first(exc)}") from None
            if filled.challenge_id != challenge.id:
                raise RemoteError("the provider filled for another challenge")
            verdict = self._walk_and_check(uuid, challenge, simulated, expect_s, starting)
        except (RemoteError, ValueError, TypeError, KeyError) as exc:
            starting.abort()  # the others go on without waiting for this one
            verdict = Verdict(False, str(exc))
        except threading.BrokenBarrierError:
            verdict = self._walk_and_check(uuid, challenge, simulated, expect_s, None)
        verdict.figures["bytes_exchanged"] = self._bytes.get(uuid, 0)
        outcome = Outcome(uuid, model, simulated, verdict)
        if challenge is not None:
            signed = sign_verdict(self.signer, challenge, simulated, verdict)
            try:
                self._json("POST", f"/gpus/{uuid}/proof/result", signed, uuid)
                outcome.stored = True
            except RemoteError as exc:
                verdict.figures["not_recorded"] = str(exc)
        return outcome

    def _params(self, info: ProofInfo) -> Params:
        """What to prove, from the verifier's own knowledge: the catalogue's memory for
        the model the provider advertises; a simulated GPU's (host) memory as said,
        bounded, since its verdict reads as simulated and counts for no real GPU."""
        if info.simulated:
            if not 1 << 20 <= info.memory_bytes <= MAX_SIMULATED_BYTES:
                raise RemoteError(f"a simulated GPU proves 1 MiB to 4 GiB, not {info.memory_bytes}")
            return cpu_params(info.memory_bytes)
        model = catalogue.models().get(info.model)
        if model is None:
            raise RemoteError(
                f"{info.model!r} is not in the GPU catalogue: nothing to prove against"
            )
        return model_params(model)

    def _walk_and_check(
        self,
        uuid: str,
        challenge: Challenge | None,
        simulated: bool,
        expect_s: float | None,
        starting: threading.Barrier | None,
    ) -> Verdict:
        if challenge is None:
            return Verdict(False, "no challenge was filled")
        try:
            params = challenge.params
            timing = None if simulated else calibration.expected(challenge.model, params)
            if expect_s is None and timing and timing.measured:
                expect_s = timing.seconds
            if not simulated and expect_s is None:
                why = f"{timing.source}, not measured" if timing else "no calibration"
                raise RemoteError(
                    f"cannot time the walk ({why}): an untimed walk does not show the memory "
                    "is there; run bench/gpu.sh on this model or pass --expect-seconds"
                )
            if starting is not None:
                starting.wait()
            nonce = new_nonce()
            walk_body = {"challenge_id": challenge.id, "nonce": nonce}
            t0 = time.perf_counter()
            answer = self._json("POST", f"/gpus/{uuid}/proof/walk", walk_body, uuid)
            elapsed = time.perf_counter() - t0
            commitment = Commitment.from_dict(answer, params)
            if commitment.nonce != nonce:
                raise RemoteError("the walk answers another nonce")
            wanted = pick_openings(params)
            body = {"challenge_id": challenge.id, "openings": [list(w) for w in wanted]}
            limit = len(wanted) * params.opening_bytes
            opened = self._call("POST", f"/gpus/{uuid}/proof/open", body, uuid, limit=limit)
            verdict = verify(challenge, commitment, wanted, opened, elapsed, expect_s)
        except (RemoteError, ValueError, TypeError, KeyError) as exc:
            return Verdict(False, str(exc))
        if simulated:
            verdict.figures["timing"] = "not enforced: simulated GPU (CPU prover)"
        return verdict


def _first(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "answer"
        return f"{where}: {error['msg']}"
    return str(exc)
