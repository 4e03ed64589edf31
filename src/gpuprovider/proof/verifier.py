"""The verifier: needs a CPU and a second, never a GPU. Its verdicts are signed with
its own key; a provider keeps only verdicts from verifier keys it trusts."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gpuprovider.identity.keys import public_key_hex
from gpuprovider.proof import native
from gpuprovider.proof import protocol as P
from gpuprovider.proof.protocol import Challenge, Params, ProofError
from gpuprovider.proof.prover import Commitment

# An honest, calibrated answer lands within this ratio of the expected walk time. Models
# whose measured resource differs by >= 25 % fall outside each other's window
# (1 / 1.25 = 0.8 < 0.85; 1.25 > 1.2); docs/proof-of-gpu.md says what that rests on.
WINDOW = (0.85, 1.2)
VERDICT_VERSION = "gpuprovider-verdict-v2"  # v2: names the proof protocol
VERDICT_FIELDS = (
    "version",
    "protocol",
    "challenge_id",
    "gpu_uuid",
    "model",
    "simulated",
    "provider_key",
    "covered_bytes",
    "params",
    "passed",
    "reason",
    "timed",
    "figures",
    "at",
    "verifier_key",
)


def new_challenge(gpu_uuid: str, model: str, provider_key: str, params: Params) -> Challenge:
    return Challenge(
        id=secrets.token_hex(16),
        seed=secrets.token_hex(32),
        gpu_uuid=gpu_uuid,
        model=model,
        provider_key=provider_key,
        params=params,
    )


def new_nonce() -> str:
    return secrets.token_hex(32)


def pick_openings(params: Params) -> list[tuple[int, int, int]]:
    """`checks` uniform (r, c) in every step, from the system's CSPRNG: every step is
    checked, so a step computed from a guessed state (a walk split in segments that run
    in parallel) is caught, and together they sample every entry uniformly."""
    rng = secrets.SystemRandom()
    return [
        (step, rng.randrange(params.m), rng.randrange(params.n))
        for step in range(1, params.steps + 1)
        for _ in range(params.checks)
    ]


@dataclass
class Verdict:
    passed: bool
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)
    timed: bool = False  # the walk's time was held to a calibrated window

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reason": self.reason,
            "timed": self.timed,
            "figures": self.figures,
        }


def verify(
    challenge: Challenge,
    commitment: Commitment,
    wanted: list[tuple[int, int, int]],
    opened: bytes,
    elapsed_s: float,
    expected_s: float | None,
) -> Verdict:
    """Check a walk's commitment and openings against the challenge the verifier issued
    and the nonce it sent (`commitment.nonce` must be that nonce: the caller checks)."""
    t0 = time.process_time()
    params = challenge.params
    figures: dict[str, Any] = {
        "walk_s": round(elapsed_s, 3),
        "expected_s": round(expected_s, 3) if expected_s else None,
        "covered_bytes": params.covered_bytes,
        "openings": len(wanted),
        "false_accept_if_5pct_skipped": P.false_accept(len(wanted), P.SKIP_FRACTION),
        "verifier_kernel": native.kernel(),  # native or numpy: the same bits, not the same CPU
    }

    def fail(reason: str) -> Verdict:
        figures["verifier_cpu_s"] = round(time.process_time() - t0, 3)
        return Verdict(False, reason, figures)

    if commitment.challenge_id != challenge.id:
        return fail("the commitment answers another challenge (a replayed or foreign proof)")
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(challenge.provider_key))
        key.verify(
            bytes.fromhex(commitment.signature),
            P.commitment_digest(challenge.id, commitment.nonce, commitment.roots),
        )
    except (ValueError, InvalidSignature):
        return fail("the commitment is not signed by the provider's pinned node key")
    first = challenge.first_state(commitment.nonce)
    if P.merkle_root(0, first) != commitment.root(0):
        return fail("the first state is not the one this walk seeds (wrong nonce, seed or GPU)")
    if len(opened) != len(wanted) * params.opening_bytes:
        return fail(
            f"openings are {len(opened)} bytes; {len(wanted)} openings take "
            f"{len(wanted) * params.opening_bytes}"
        )
    prev_rows = np.empty((len(wanted), params.n), dtype=np.int64)
    got = np.empty(len(wanted), dtype=np.int64)
    js = np.empty((len(wanted), params.per_step), dtype=np.int64)
    cols = np.empty(len(wanted), dtype=np.int64)
    row_size, path_size = params.n, 32 * params.depth
    step_indices: dict[int, np.ndarray] = {}
    at = 0
    for o, (step, r, c) in enumerate(wanted):
        prev_row, row, col = P.opened_rows(params, step, r, c)
        rows = []
        for state, index in ((step - 1, prev_row), (step, row)):
            data = opened[at : at + row_size]
            raw_path = opened[at + row_size : at + row_size + path_size]
            at += row_size + path_size
            path = [raw_path[i : i + 32] for i in range(0, path_size, 32)]
            if P.root_from_path(state, index, data, path) != commitment.root(state):
                return fail(f"opened row {index} of state {state} does not match the commitment")
            rows.append(np.frombuffer(data, dtype=np.int8))
        prev_rows[o] = rows[0]
        got[o] = int(rows[1][col]) + 128
        if step not in step_indices:
            step_indices[step] = P.indices(commitment.root(step - 1), step, params)
        js[o] = step_indices[step][r]
        cols[o] = c
    k0, keys = challenge.keys()
    expected = np.zeros(len(wanted), dtype=np.int64)
    for lo in range(0, len(wanted), 64):  # bounded memory: 64 openings at a time
        hi = min(len(wanted), lo + 64)
        column = P.columns(k0, keys[js[lo:hi]], params.n, cols[lo:hi], params.rounds)
        dots = np.einsum("on,own->ow", prev_rows[lo:hi], column)
        expected[lo:hi] = np.bitwise_xor.reduce(dots & 0xFF, axis=1)
    wrong = np.nonzero(expected != got)[0]
    if len(wrong):
        step, r, c = wanted[int(wrong[0])]
        return fail(
            f"{len(wrong)} of {len(wanted)} opened results are wrong (first: step {step}, "
            f"row {r}, column {c}): the walk was not done as challenged"
        )
    timed = False
    if expected_s:
        low, high = WINDOW
        ratio = elapsed_s / expected_s
        figures["time_ratio"] = round(ratio, 3)
        if not low <= ratio <= high:
            return fail(
                f"walked in {elapsed_s:.2f} s, {ratio:.2f}x the {expected_s:.2f} s expected "
                f"(window {low}x-{high}x): not the claimed GPU, or its memory is not all there"
            )
        timed = True
    figures["verifier_cpu_s"] = round(time.process_time() - t0, 3)
    return Verdict(True, "passed", figures, timed)


# -- signed verdicts ------------------------------------------------------------------


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_verdict(
    key: Ed25519PrivateKey, challenge: Challenge, simulated: bool, verdict: Verdict
) -> dict[str, Any]:
    """The verdict as the provider stores it: what was proved, signed by the verifier."""
    body = {
        "version": VERDICT_VERSION,
        "protocol": P.VERSION,
        "challenge_id": challenge.id,
        "gpu_uuid": challenge.gpu_uuid,
        "model": challenge.model,
        "simulated": simulated,
        "provider_key": challenge.provider_key,
        "covered_bytes": challenge.params.covered_bytes,
        "params": asdict(challenge.params),
        "passed": verdict.passed,
        "reason": verdict.reason,
        "timed": verdict.timed,
        "figures": verdict.figures,
        "at": time.time(),
        "verifier_key": public_key_hex(key),
    }
    signature = key.sign(hashlib.sha256(_canonical(body)).digest())
    return {"verdict": body, "signature": base64.b64encode(signature).decode()}


def check_signed_verdict(raw: Any, trusted: Collection[str]) -> dict[str, Any]:
    """The verdict inside `raw` when a trusted verifier key signed it; ProofError else."""
    if not isinstance(raw, dict) or not isinstance(raw.get("verdict"), dict):
        raise ProofError("a signed verdict is {verdict: {...}, signature: base64}")
    body = raw["verdict"]
    if set(body) != set(VERDICT_FIELDS) or body["version"] != VERDICT_VERSION:
        raise ProofError(f"a verdict has exactly the fields {', '.join(VERDICT_FIELDS)}")
    signer = body["verifier_key"]
    if signer not in trusted:
        raise ProofError(
            "the verdict is signed by a verifier key this provider does not trust "
            "([proof] trusted_verifiers)"
        )
    try:
        signature = base64.b64decode(str(raw.get("signature", "")), validate=True)
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(signer)).verify(
            signature, hashlib.sha256(_canonical(body)).digest()
        )
    except (ValueError, binascii.Error, InvalidSignature):
        raise ProofError("the verdict's signature does not verify") from None
    return body
