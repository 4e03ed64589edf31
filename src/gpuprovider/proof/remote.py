"""The verifier's side over HTTP: challenge every GPU of a provider at once, time the
walks together, open, verify, sign and report.

Nothing the provider says is believed beyond what the protocol checks: the node key
is pinned by the caller, memory sizes come from the catalogue, every field of every
answer is validated, openings are read no further than their expected length, and a
GPU whose provider misbehaves fails on its own while the others are still checked.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

import httpx
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from gpuprovider.domain import catalogue
from gpuprovider.proof import attestation, bounds, calibration
from gpuprovider.proof.protocol import (
    Challenge,
    Params,
    ProofError,
    commitment_digest,
    params_for_memory,
)
from gpuprovider.proof.prover import Commitment
from gpuprovider.proof.verifier import (
    WINDOW,
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


class AttestMode(StrEnum):
    OFF = "off"  # no attestation asked
    TRY = "try"  # asked; the verdict's figures say verified, unavailable or failed
    REQUIRE = "require"  # a GPU without a verified attestation fails


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


class Attested(_Answer):
    report: Annotated[str, Field(max_length=4 * attestation.MAX_REPORT_BYTES // 3 + 4)]
    cert_chain: Annotated[str, Field(max_length=4 * attestation.MAX_CHAIN_BYTES // 3 + 4)]


@dataclass
class Outcome:
    gpu_uuid: str
    model: str
    simulated: bool
    verdict: Verdict
    stored: bool = False


MAX_DEPTH = 32  # no answer nests deeper
MAX_NUMBER_DIGITS = 24  # no number in an answer is longer (a 401-digit one overflowed float)
INFO_TIMEOUT_S = 30.0  # a listing, an info, a result: small answers
RESULT_TIMEOUT_S = 30.0
FILL_BASE_S = 120.0


def parse_json(data: bytes, what: str) -> Any:
    """A provider's JSON answer within limits (size is bounded by the caller): nesting at
    most MAX_DEPTH, numbers of at most MAX_NUMBER_DIGITS characters, finite. Anything
    else is a RemoteError naming `what`, never a RecursionError or OverflowError."""
    raw = bytes(data)
    # depth: brackets outside strings (strings removed first; escapes kept inside them)
    bare = _STRINGS.sub(b'""', raw)
    brackets = np.frombuffer(bare.translate(None, _NOT_BRACKETS), dtype=np.uint8)
    if len(brackets):
        steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
        if int(np.cumsum(steps).max()) > MAX_DEPTH:
            raise RemoteError(f"{what}: JSON nested deeper than {MAX_DEPTH}")

    def number(text: str, kind: type) -> Any:
        if len(text) > MAX_NUMBER_DIGITS:
            raise RemoteError(
                f"{what}: a number of {len(text)} characters (at most {MAX_NUMBER_DIGITS})"
            )
        value = kind(text)
        if kind is float and not math.isfinite(value):
            raise RemoteError(f"{what}: a number out of range")
        return value

    def constant(text: str) -> Any:
        raise RemoteError(f"{what}: {text} is not a number")

    try:
        return json.loads(
            raw,
            parse_int=lambda t: number(t, int),
            parse_float=lambda t: number(t, float),
            parse_constant=constant,
        )
    except (ValueError, RecursionError):
        raise RemoteError(f"{what}: the answer is not JSON") from None


_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


@dataclass
class Deadline:
    """One GPU's own clock: every call for it ends by `at`, whatever the provider does."""

    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def left(self) -> float:
        return self.at - time.monotonic()


class StartGate:
    """Every GPU's walk starts together: each waits until every GPU has filled or failed.
    A GPU that fails leaves at once (its failure never holds the others), and a waiting
    GPU gives up at its own deadline, derived from its fill, never a fixed 900 s."""

    def __init__(self, count: int):
        self.count, self.done = count, 0
        self.cond = threading.Condition()

    def leave(self) -> None:
        with self.cond:
            self.done += 1
            self.cond.notify_all()

    def arrive_and_wait(self, deadline: Deadline) -> bool:
        """True when all arrived or left; False when `deadline` came first."""
        with self.cond:
            self.done += 1
            self.cond.notify_all()
            return self.cond.wait_for(lambda: self.done >= self.count, max(0.0, deadline.left()))


def fill_limit_s(params: Params, simulated: bool) -> float:
    """How long a fill may take: its words times the rounds, at 2 ns a word-round on a CPU
    (numpy speed; the native fill is ~15x faster), or at the traffic of PyTorch's unfused
    fill (12 passes of 16 bytes a word-round) at 1 TB/s on a GPU (a fused fill is far
    faster); plus a fixed allowance."""
    word_rounds = params.covered_bytes / 4 * params.rounds
    per = 2e-9 if simulated else 12 * 16 / 1e12
    return FILL_BASE_S + word_rounds * per


def walk_limit_s(params: Params, expect_s: float | None) -> float:
    """How long a walk may take before the GPU fails: past the window's edge when timed;
    untimed (a simulated GPU), at 0.2 GB/s of matrix reads (numpy speed, with margin)."""
    if expect_s:
        return expect_s * WINDOW[1] * 1.5 + 10.0
    return 30.0 + params.uses * params.covered_bytes / 0.2e9


class RemoteVerifier:
    def __init__(
        self,
        url: str,
        token: str | None,
        provider_key: str,
        signer: Ed25519PrivateKey,
        timeout_s: float = 900.0,
        allow_estimated: bool = False,
        attest: AttestMode = AttestMode.OFF,
        attestation_root: x509.Certificate | None = None,
    ):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(
            base_url=url.rstrip("/") + "/api/v1", headers=headers, timeout=timeout_s
        )
        self.url, self.provider_key, self.signer = url, provider_key.lower(), signer
        self.timeout_s = timeout_s  # no single call lasts longer, whatever its deadline
        self.allow_estimated = allow_estimated  # time real GPUs against published bandwidth
        self.attest = attest
        self.attestation_root = attestation_root  # None: NVIDIA's pinned root
        self._bytes: dict[str, int] = {}
        self._lock = threading.Lock()

    def _count(self, uuid: str, size: int) -> None:
        with self._lock:
            self._bytes[uuid] = self._bytes.get(uuid, 0) + size

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        uuid: str = "",
        limit: int = 0,
        deadline: Deadline | None = None,
    ) -> bytes:
        """One request; the answer's bytes (at most `limit`, else MAX_JSON_BYTES), all of it
        by `deadline` (else INFO_TIMEOUT_S from now): a provider that trickles fails."""
        content = json.dumps(body).encode() if body is not None else None
        limit = limit or MAX_JSON_BYTES
        deadline = deadline or Deadline.after(INFO_TIMEOUT_S)
        left = min(self.timeout_s, deadline.left())
        if left <= 0:
            raise RemoteError(f"{method} {path}: this GPU's deadline has passed")
        try:
            with self.http.stream(
                method,
                path,
                content=content,
                headers={"Content-Type": "application/json"},
                timeout=httpx.Timeout(left),
            ) as response:
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limit:
                    raise RemoteError(f"{method} {path}: answer of {declared} bytes; limit {limit}")
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > limit:
                        raise RemoteError(f"{method} {path}: answer over {limit} bytes")
                    if deadline.left() <= 0:
                        raise RemoteError(f"{method} {path}: answer unfinished at the deadline")
        except httpx.TimeoutException:
            raise RemoteError(f"{method} {path}: no answer within {left:.0f} s") from None
        except httpx.TransportError as exc:
            raise RemoteError(f"cannot reach {self.url}: {exc.__class__.__name__}") from None
        self._count(uuid, len(content or b"") + len(data))
        if response.status_code >= 400:
            # only a gpuprovider API's own error is repeated: whatever else answers at
            # that URL (the hub proves URLs providers give it) stays unread
            try:
                message = parse_json(bytes(data[:65536]), "error").get("error")
            except (RemoteError, AttributeError):
                message = None
            shown = message[:300] if isinstance(message, str) else "(not a gpuprovider answer)"
            raise RemoteError(f"{method} {path}: {response.status_code} {shown}")
        return bytes(data)

    def _json(
        self,
        method: str,
        path: str,
        body: Any = None,
        uuid: str = "",
        deadline: Deadline | None = None,
    ) -> Any:
        data = self._call(method, path, body, uuid, deadline=deadline)
        return parse_json(data, f"{method} {path}")

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
        and timed on its own, so one device cannot answer for several in turn. Each GPU
        runs against its own deadlines; one that misbehaves fails alone."""
        if not uuids:
            return []
        gate = StartGate(len(uuids))
        with ThreadPoolExecutor(max_workers=len(uuids)) as pool:
            return list(pool.map(lambda u: self._prove(u, expect_s, gate), uuids))

    def _prove(self, uuid: str, expect_s: float | None, gate: StartGate) -> Outcome:
        model, simulated = "?", False
        challenge: Challenge | None = None
        waiting = True  # still counted at the gate
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
            params = self._params(info)
            expect_s, calibrated = self._expected(model, simulated, params, expect_s)
            challenge = new_challenge(uuid, model, self.provider_key, params)
            fill_by = Deadline.after(fill_limit_s(params, simulated))
            try:
                filled = Filled.model_validate(
                    self._json(
                        "POST", f"/gpus/{uuid}/proof/challenge", challenge.to_dict(), uuid, fill_by
                    )
                )
            except ValidationError as exc:
                raise RemoteError(f"malformed fill answer: {_first(exc)}") from None
            if filled.challenge_id != challenge.id:
                raise RemoteError("the provider filled for another challenge")
            waiting = False
            together = gate.arrive_and_wait(fill_by)
            verdict = self._walk_and_check(uuid, challenge, simulated, expect_s, calibrated)
            if not together:
                verdict.figures["started"] = "alone: another GPU was filling past its deadline"
        except Exception as exc:  # whatever a provider sends fails this GPU alone
            verdict = Verdict(False, _reason(exc))
        finally:
            if waiting:
                gate.leave()  # the others go on without waiting for this one
        verdict.figures["bytes_exchanged"] = self._bytes.get(uuid, 0)
        outcome = Outcome(uuid, model, simulated, verdict)
        if challenge is not None:
            signed = sign_verdict(self.signer, challenge, simulated, verdict)
            try:
                self._json(
                    "POST",
                    f"/gpus/{uuid}/proof/result",
                    signed,
                    uuid,
                    Deadline.after(RESULT_TIMEOUT_S),
                )
                outcome.stored = True
            except Exception as exc:  # the verdict stands; storing it failed
                verdict.figures["not_recorded"] = _reason(exc)
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

    def _expected(
        self, model: str, simulated: bool, params: Params, expect_s: float | None
    ) -> tuple[float | None, str]:
        """The walk time a real GPU is held to, and where it comes from: the caller's
        ("given"), the model's measured one, or (only when this verifier opted in) the one
        estimated from its published bandwidth. Without any, a real GPU fails before its
        fill: an untimed walk shows nothing about its memory."""
        if simulated:
            return None, "none: simulated GPU (CPU prover)"
        if expect_s is not None:
            return expect_s, "given"
        timing = calibration.expected(model, params)
        if timing is not None and (timing.measured or self.allow_estimated):
            return timing.seconds, f"{timing.kind}: {timing.source}"
        why = f"{timing.source}: estimated, not measured" if timing else "no calibration"
        raise RemoteError(
            f"cannot time the walk ({why}): an untimed walk does not show the memory is "
            "there; run bench/gpu.sh on this model, pass --expect-seconds, or allow "
            "estimated calibrations (--allow-estimated)"
        )

    def _walk_and_check(
        self,
        uuid: str,
        challenge: Challenge,
        simulated: bool,
        expect_s: float | None,
        calibrated: str,
    ) -> Verdict:
        params = challenge.params
        nonce = new_nonce()
        walk_body = {"challenge_id": challenge.id, "nonce": nonce}
        t0 = time.perf_counter()
        answer = self._json(
            "POST",
            f"/gpus/{uuid}/proof/walk",
            walk_body,
            uuid,
            Deadline.after(walk_limit_s(params, expect_s)),
        )
        elapsed = time.perf_counter() - t0
        commitment = Commitment.from_dict(answer, params)
        if commitment.nonce != nonce:
            raise RemoteError("the walk answers another nonce")
        wanted = pick_openings(params)
        body = {"challenge_id": challenge.id, "openings": [list(w) for w in wanted]}
        limit = len(wanted) * params.opening_bytes
        opened = self._call(
            "POST",
            f"/gpus/{uuid}/proof/open",
            body,
            uuid,
            limit=limit,
            deadline=Deadline.after(INFO_TIMEOUT_S + limit / 1e6),
        )
        verdict = verify(challenge, commitment, wanted, opened, elapsed, expect_s)
        if verdict.passed and self.attest is not AttestMode.OFF:
            self._attest(uuid, challenge, commitment, simulated, verdict)
        if simulated:
            verdict.figures["timing"] = "not enforced: simulated GPU (CPU prover)"
        else:
            verdict.figures["calibration"] = calibrated
        return verdict

    def _attested(
        self, uuid: str, challenge: Challenge, commitment: Commitment, simulated: bool
    ) -> str:
        """ "verified: <the GPU's certificate>", "unavailable: why" or "failed: why"."""
        if simulated:
            return "unavailable: a simulated GPU has no hardware to attest"
        digest = commitment_digest(challenge.id, commitment.nonce, commitment.roots)
        nonce = attestation.nonce_for(challenge.id, digest)
        body = {"challenge_id": challenge.id, "nonce": nonce.hex()}
        try:
            raw = self._json("POST", f"/gpus/{uuid}/proof/attestation", body, uuid)
        except RemoteError as exc:
            return f"unavailable: {str(exc)[:300]}"
        try:
            got = Attested.model_validate(raw)
            leaf = attestation.verify_report(
                base64.b64decode(got.report, validate=True),
                base64.b64decode(got.cert_chain, validate=True),
                nonce,
                self.attestation_root,
            )
        except ValidationError as exc:
            return f"failed: malformed attestation ({_first(exc)})"
        except (attestation.AttestationError, binascii.Error, ValueError) as exc:
            return f"failed: {str(exc)[:300]}"
        return f"verified: {leaf.subject.rfc4514_string()[:200]}"

    def _attest(
        self,
        uuid: str,
        challenge: Challenge,
        commitment: Commitment,
        simulated: bool,
        verdict: Verdict,
    ) -> None:
        found = self._attested(uuid, challenge, commitment, simulated)
        verdict.figures["attestation"] = found
        if self.attest is AttestMode.REQUIRE and not found.startswith("verified"):
            verdict.passed = False
            verdict.reason = f"an NVIDIA CC attestation is required: {found}"


def _reason(exc: Exception) -> str:
    """A failure as the verdict says it: the message of what we raise, the kind of
    anything else (never a traceback)."""
    if isinstance(exc, RemoteError | ProofError):
        return str(exc)[:500]
    return f"the provider's answers broke the check ({type(exc).__name__}: {str(exc)[:200]})"


def _first(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "answer"
        return f"{where}: {error['msg']}"
    return str(exc)
