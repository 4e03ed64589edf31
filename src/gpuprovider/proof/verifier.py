"""The verifier: needs a CPU and a second, never a GPU."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gpuprovider.proof import protocol as P
from gpuprovider.proof.protocol import Challenge, Params
from gpuprovider.proof.prover import Commitment

# GraVal's window: an honest answer lands between 0.55x and 1.7x the expected time.
WINDOW = (0.55, 1.7)


def new_challenge(gpu_uuid: str, provider_key: str, params: Params) -> Challenge:
    return Challenge(
        id=secrets.token_hex(16),
        seed=secrets.token_hex(32),
        gpu_uuid=gpu_uuid,
        provider_key=provider_key,
        params=params,
    )


def pick_openings(params: Params) -> list[tuple[int, int, int]]:
    """Uniform (step, r, c) over every entry of every step, from the system's CSPRNG."""
    rng = secrets.SystemRandom()
    return [
        (rng.randint(1, params.steps), rng.randrange(params.m), rng.randrange(params.n))
        for _ in range(params.openings)
    ]


@dataclass
class Verdict:
    passed: bool
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason, "figures": self.figures}


def verify(
    challenge: Challenge,
    commitment: Commitment,
    wanted: list[tuple[int, int, int]],
    opened: bytes,
    elapsed_s: float,
    expected_s: float | None,
) -> Verdict:
    """Check a commitment and its openings against the challenge the verifier issued."""
    t0 = time.process_time()
    params = challenge.params
    figures: dict[str, Any] = {
        "elapsed_s": round(elapsed_s, 3),
        "expected_s": round(expected_s, 3) if expected_s else None,
        "covered_bytes": params.covered_bytes,
        "openings": len(wanted),
        "false_accept_if_1pct_skipped": P.false_accept(len(wanted), 0.01),
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
            P.commitment_digest(challenge.id, commitment.roots),
        )
    except (ValueError, InvalidSignature):
        return fail("the commitment is not signed by the provider's node key")
    k0, keys = challenge.keys()
    first = np.asarray(
        P.bytes_to_int8(
            np,
            P.words(P.table(np, k0, params.n), int(keys[-1])).reshape(params.n, params.n // 4),
            params.n,
        ).T[: params.m],
        dtype=np.int8,
    )
    if P.merkle_levels(0, first)[-1][0] != commitment.root(0):
        return fail("the first state is not the one this challenge seeds (wrong seed or GPU)")
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
        js[o] = P.indices(commitment.root(P.epoch_start(step, params)), step, params)
        cols[o] = c
    expected = np.zeros(len(wanted), dtype=np.int64)
    for lo in range(0, len(wanted), 256):  # bounded memory: 256 openings at a time
        hi = min(len(wanted), lo + 256)
        column = P.columns(k0, keys[js[lo:hi]], params.n, cols[lo:hi])  # [o, w, n]
        dots = np.einsum("on,own->ow", prev_rows[lo:hi], column)
        expected[lo:hi] = np.bitwise_xor.reduce(dots & 0xFF, axis=1)
    wrong = np.nonzero(expected != got)[0]
    if len(wrong):
        step, r, c = wanted[int(wrong[0])]
        return fail(
            f"{len(wrong)} of {len(wanted)} opened results are wrong (first: step {step}, "
            f"row {r}, column {c}): the work was not done as challenged"
        )
    if expected_s:
        lo, hi = WINDOW
        ratio = elapsed_s / expected_s
        figures["time_ratio"] = round(ratio, 3)
        if not lo <= ratio <= hi:
            return fail(
                f"answered in {elapsed_s:.2f} s, {ratio:.2f}x the {expected_s:.2f} s expected "
                f"(window {lo}x-{hi}x): not the claimed GPU, or its memory is not all there"
            )
    figures["verifier_cpu_s"] = round(time.process_time() - t0, 3)
    return Verdict(True, "passed", figures)
