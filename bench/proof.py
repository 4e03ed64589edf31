"""Proof-of-GPU figures: the memory/time trade-off against cheating provers, verifier
CPU and bytes per GPU, prover time over a bare baseline.

One challenge over `--memory-mib` (the CPU prover's parameters on the CPU, a GPU's on
`--device cuda:N`). In the same run, on the same challenge and nonce:
- the honest prover: fill (untimed by the verifier), walk (what the verifier times);
- provers keeping 90 %, 50 %, 25 % and 0 % of the matrices and making the others on
  each read with the fastest generator we have (the one the honest fill uses);
- grinding provers (keeping 90 % and 50 %) that also try 64 roots per step to steer
  the next reads toward what they kept;
- a bare baseline: the same fill and the same number of gathers and products with
  random indices, no hashing, no roots.
Each cheater's walk time is printed over the honest walk's, beside the ratio the
analysis in docs/proof-of-gpu.md predicts from this run's own cost of making one
matrix (rho: making / reading). The 80 GB H100 row is computed from the formulas.

Usage: python bench/proof.py [--memory-mib 128] [--device cuda:0]
Prints a human summary, then JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gpuprovider.identity.keys import public_key_hex
from gpuprovider.proof import protocol as P
from gpuprovider.proof.cheats import GrindingProver, PartialMemoryBackend, TorchPartialBackend
from gpuprovider.proof.prover import Prover, pick_backend
from gpuprovider.proof.remote import cpu_params, gpu_params
from gpuprovider.proof.verifier import new_challenge, new_nonce, pick_openings, verify

KEEPS = (0.9, 0.5, 0.25, 0.0)
GRIND_KEEPS = (0.9, 0.5)
GRIND_TRIES = 64
H100_BYTES = 80 * 2**30


def partial(device: str | None, keep: float):
    if device:
        import torch

        return TorchPartialBackend(torch, device, keep)
    return PartialMemoryBackend(keep)


def walk_s(prover: Prover, nonce: str) -> float:
    prover.fill()
    t0 = time.perf_counter()
    prover.walk(nonce)
    elapsed = time.perf_counter() - t0
    prover.release()
    return elapsed


def bare(challenge, device: str | None) -> tuple[float, float]:
    """(fill, steps) seconds: the same fill and products, random indices, no roots."""
    params = challenge.params
    backend = pick_backend(device)
    backend.allocate(params)
    k0, keys = challenge.keys()
    t0 = time.perf_counter()
    for start in range(0, params.matrices, 16):
        backend.fill(k0, keys, start, min(params.matrices, start + 16))
    fill = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    state = backend.from_host(rng.integers(-128, 128, (params.m, params.n), dtype=np.int8))
    t0 = time.perf_counter()
    for _ in range(params.steps):
        js = rng.integers(0, params.matrices, (params.m, params.per_step))
        state = backend.step(state, js)
    backend.to_host(state)
    steps = time.perf_counter() - t0
    backend.release()
    return fill, steps


def make_s(challenge, count: int = 32) -> float:
    """Seconds to make one matrix again, the cheapest way we have (CPU)."""
    params = challenge.params
    k0, keys = challenge.keys()
    t0 = time.perf_counter()
    P.make_matrices(k0, keys[:count], params.n, params.rounds)
    return (time.perf_counter() - t0) / count


def h100_verifier_cpu_s() -> tuple[float, int]:
    """(verifier CPU seconds, openings) for an 80 GB H100's challenge: its parameters but
    few matrices, proved on the CPU; per opening the work is the same, so it scales by
    the H100's opening count."""
    key = Ed25519PrivateKey.generate()
    small = gpu_params(64 * 2**20)
    h100 = gpu_params(H100_BYTES)
    challenge = new_challenge("GPU-bench", "h100-80gb-sxm", public_key_hex(key), small)
    prover, nonce = Prover(challenge), new_nonce()
    prover.fill()
    commitment = prover.walk(nonce)
    commitment.signature = key.sign(
        P.commitment_digest(challenge.id, nonce, commitment.roots)
    ).hex()
    wanted = pick_openings(small)
    opened = prover.open(wanted)
    cpu0 = time.process_time()
    assert verify(challenge, commitment, wanted, opened, 1.0, None).passed
    return (time.process_time() - cpu0) * h100.openings / len(wanted), h100.openings


def predicted(keep: float, rho: float, gain: float = 0.0) -> float:
    """Walk time over the honest walk's for a prover keeping `keep`: kept reads cost a
    read, missing ones (fewer by `gain` when grinding) a making and a read."""
    return keep + (1 - keep) * (1 - gain) * (1 + rho) + (1 - keep) * gain


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory-mib", type=int, default=128)
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--keeps", default=",".join(map(str, KEEPS)), help="memory fractions cheaters keep"
    )
    args = parser.parse_args()
    keeps = [float(k) for k in args.keeps.split(",")]
    memory = args.memory_mib * 2**20
    params = gpu_params(memory) if args.device else cpu_params(memory)
    key = Ed25519PrivateKey.generate()
    challenge = new_challenge("GPU-bench", "bench", public_key_hex(key), params)
    nonce = new_nonce()

    honest = Prover(challenge, pick_backend(args.device))
    fill_s = honest.fill()
    honest.walk(new_nonce())  # warm the allocator, as the cheaters after it will find it
    t0 = time.perf_counter()
    commitment = honest.walk(nonce)
    honest_s = time.perf_counter() - t0
    honest.release()
    commitment.signature = key.sign(
        P.commitment_digest(challenge.id, nonce, commitment.roots)
    ).hex()
    wanted = pick_openings(params)
    opened = honest.open(wanted)
    cpu0 = time.process_time()
    verdict = verify(challenge, commitment, wanted, opened, honest_s, None)
    verifier_cpu = time.process_time() - cpu0
    assert verdict.passed, verdict.reason
    sent = (
        len(json.dumps(challenge.to_dict()))
        + len(json.dumps({"challenge_id": challenge.id, "fill_s": 1.0}))
        + len(json.dumps({"challenge_id": challenge.id, "nonce": nonce}))
        + len(json.dumps(commitment.to_dict()))
        + len(json.dumps({"challenge_id": challenge.id, "openings": [list(w) for w in wanted]}))
        + len(opened)
    )
    bare_fill, bare_steps = bare(challenge, args.device)

    reads = params.steps * params.reads_per_step
    rho = make_s(challenge) / (honest_s / reads) if not args.device else None
    rows = []
    for keep in keeps:
        backend = partial(args.device, keep)
        elapsed = walk_s(Prover(challenge, backend), nonce)
        rows.append(
            {
                "kept_pct": round(100 * keep),
                "walk_s": round(elapsed, 3),
                "vs_honest": round(elapsed / honest_s, 2),
                "predicted": round(predicted(keep, rho), 2) if rho else None,
                "matrices_made": backend.made,
            }
        )
    if not args.device:
        for keep in (k for k in GRIND_KEEPS if k in keeps):
            grinder = GrindingProver(challenge, keep, GRIND_TRIES)
            elapsed = walk_s(grinder, nonce)
            gain = 1 - grinder.missing_after / max(1, grinder.missing_before)
            rows.append(
                {
                    "kept_pct": round(100 * keep),
                    "grinding_tries": GRIND_TRIES,
                    "walk_s": round(elapsed, 3),
                    "vs_honest": round(elapsed / honest_s, 2),
                    "predicted": round(predicted(keep, rho, gain), 2),
                    "missing_avoided_pct": round(100 * gain, 1),
                    "bound_pct": round(
                        100 * P.grinding_gain(keep, params.reads_per_step, GRIND_TRIES), 1
                    ),
                    "wrong_entries": grinder.wrong_entries,
                }
            )

    h100 = gpu_params(H100_BYTES)
    h100_cpu, _ = h100_verifier_cpu_s()
    h100_bytes = h100.openings * (h100.opening_bytes + 16) + 4 * 32 * (h100.steps + 1) // 3
    figures = {
        "memory_mib": args.memory_mib,
        "params": params.__dict__,
        "prover": commitment.backend,
        "covered_pct": round(100 * params.covered_bytes / memory, 2),
        "fill_s": round(fill_s, 2),
        "walk_s": round(honest_s, 3),
        "bare_fill_s": round(bare_fill, 2),
        "bare_steps_s": round(bare_steps, 3),
        "prover_vs_bare": round((fill_s + honest_s) / (bare_fill + bare_steps), 3),
        "walk_vs_bare_steps": round(honest_s / bare_steps, 3),
        "rho_make_over_read": round(rho, 1) if rho else None,
        "tradeoff": rows,
        "verifier_cpu_s": round(verifier_cpu, 3),
        "bytes_exchanged": sent,
        "h100_80gb": {
            "params": h100.__dict__,
            "bytes_exchanged_computed": h100_bytes,
            "verifier_cpu_s": round(h100_cpu, 3),
            "false_accept_if_5pct_skipped": P.false_accept(h100.openings, P.SKIP_FRACTION),
            "false_accept_one_guessed_step": 256.0**-h100.checks,
            "grinding_gain_q90_2e20_tries": round(
                P.grinding_gain(0.9, h100.reads_per_step, 2**20), 3
            ),
        },
    }
    print(f"proof over {args.memory_mib} MiB with the {commitment.backend} prover: {params}")
    print(f"  memory covered         {figures['covered_pct']} %")
    print(f"  fill (untimed)         {fill_s:.2f} s   bare fill {bare_fill:.2f} s")
    print(f"  walk (timed)           {honest_s:.3f} s  bare steps {bare_steps:.3f} s")
    print(
        f"  prover over bare       {figures['prover_vs_bare']:.3f}x (goal <= 1.15x); "
        f"walk over bare steps {figures['walk_vs_bare_steps']:.3f}x"
    )
    if rho:
        print(f"  making a matrix        {rho:.1f}x reading it in the walk (rho)")
    for row in rows:
        label = f"keeps {row['kept_pct']:>3} %" + (" + grinding" if "grinding_tries" in row else "")
        extra = (
            f", avoided {row['missing_avoided_pct']} % of missing reads (bound "
            f"{row['bound_pct']} %)"
            if "grinding_tries" in row
            else ""
        )
        print(
            f"  {label:<22} {row['walk_s']:.2f} s = {row['vs_honest']:.2f}x honest "
            f"(predicted {row['predicted']}x){extra}"
        )
    print(f"  verifier CPU           {verifier_cpu:.3f} s  (goal < 2 s)")
    print(f"  bytes exchanged        {sent / 1e6:.2f} MB")
    print(
        f"  80 GB H100             {h100_bytes / 1e6:.2f} MB computed, {h100.steps} steps, "
        f"verifier CPU {h100_cpu:.2f} s (scaled from {h100.openings} openings' cost)"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
