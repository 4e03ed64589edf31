"""Proof-of-GPU figures: verifier CPU time and bytes per GPU, prover time and overhead.

One honest proof at the default matrix size (n = 1024, m = 64) over `--memory-mib` of
memory, proved with the numpy prover (or PyTorch on `--device cuda:N`), verified with
the CPU verifier. Baselines in the same run: the same int8 GEMMs run bare (same shapes
and count, no generation, no hashing), and bare fill + GEMMs (generation included).
A prover keeping only a quarter of the matrices resident (right answers, regenerated on
use) is timed against the honest one: the ratio is what the timing window must catch.
Bytes are counted as the HTTP exchange carries them (JSON challenge, commitment,
openings request; binary openings). The 80 GB H100 row is computed from the same
formulas: the openings do not depend on memory size, the commitment grows by 32 bytes
per chain step.

Usage: python bench/proof.py [--memory-mib 256] [--device cuda:0]
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
from gpuprovider.proof.partial import PartialMemoryBackend
from gpuprovider.proof.prover import NumpyBackend, Prover, pick_backend
from gpuprovider.proof.verifier import new_challenge, pick_openings, verify

H100_MIB = 81559


def wire_bytes(challenge, commitment, wanted, opened: bytes) -> int:
    request = json.dumps({"challenge_id": challenge.id, "openings": [list(w) for w in wanted]})
    return (
        len(json.dumps(challenge.to_dict()))
        + len(json.dumps(commitment.to_dict()))
        + len(request)
        + len(opened)
    )


def bare(params, device: str | None, with_fill: bool) -> float:
    """The chain's GEMMs alone (random operands), optionally after filling memory."""
    backend = pick_backend(device)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    if with_fill:
        k0, keys = P.Challenge("00" * 16, "00" * 32, "GPU-bare", "00" * 32, params).keys()
        backend.allocate(params)
        for start in range(0, params.matrices, 64):
            backend.generate(k0, keys, params.n, start, min(params.matrices, start + 64))
    state = rng.integers(-128, 128, (params.m, params.n), dtype=np.int8)
    pool = rng.integers(-128, 128, (params.per_step, params.n, params.n), dtype=np.int8)
    if backend.name == "torch":
        state = backend.torch.as_tensor(state, device=backend.device)
        pool = backend.torch.as_tensor(pool, device=backend.device)
    for _ in range(params.steps):
        state = backend.step(state, pool, params)
    backend.to_host(state)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    memory = args.memory_mib * 2**20
    params = P.params_for_memory(memory)
    key = Ed25519PrivateKey.generate()
    challenge = new_challenge("GPU-bench", public_key_hex(key), params)
    prover = Prover(challenge, pick_backend(args.device))
    t0 = time.perf_counter()
    commitment = prover.commit()
    prover_s = time.perf_counter() - t0
    commitment.signature = key.sign(P.commitment_digest(challenge.id, commitment.roots)).hex()
    wanted = pick_openings(params)
    opened = prover.open(wanted)
    cpu0 = time.process_time()
    verdict = verify(challenge, commitment, wanted, opened, prover_s, None)
    verifier_cpu = time.process_time() - cpu0
    assert verdict.passed, verdict.reason
    sent = wire_bytes(challenge, commitment, wanted, opened)
    backend = commitment.backend
    t0 = time.perf_counter()
    Prover(challenge, PartialMemoryBackend(keep=0.25)).commit()  # numpy, on the CPU
    partial_s = time.perf_counter() - t0
    honest_cpu_s = prover_s
    if backend != "numpy":  # compare like with like: the honest prover on the CPU too
        t0 = time.perf_counter()
        Prover(challenge, NumpyBackend()).commit()
        honest_cpu_s = time.perf_counter() - t0
    gemm_s = bare(params, args.device, with_fill=False)
    fill_gemm_s = bare(params, args.device, with_fill=True)
    h100 = P.params_for_memory(H100_MIB * 2**20)
    h100_bytes = sent + 4 * 32 * (h100.steps - params.steps) // 3  # base64 roots
    figures = {
        "memory_mib": args.memory_mib,
        "params": params.__dict__,
        "prover": backend,
        "vram_covered_pct": round(100 * params.covered_bytes / memory, 2),
        "prover_s": round(prover_s, 2),
        "bare_gemm_s": round(gemm_s, 2),
        "bare_fill_and_gemm_s": round(fill_gemm_s, 2),
        "overhead_vs_bare_gemm": round(prover_s / gemm_s, 2),
        "overhead_vs_bare_fill_and_gemm": round(prover_s / fill_gemm_s, 2),
        "quarter_memory_prover_vs_honest_cpu": round(partial_s / honest_cpu_s, 2),
        "verifier_cpu_s": round(verifier_cpu, 3),
        "bytes_exchanged": sent,
        "h100_80gb": {
            "params": h100.__dict__,
            "bytes_exchanged_computed": h100_bytes,
            "false_accept_if_1pct_skipped": P.false_accept(h100.openings, 0.01),
        },
    }
    print(f"proof over {args.memory_mib} MiB with the {backend} prover: {params}")
    print(f"  memory covered           {figures['vram_covered_pct']} %   (goal >= 95 %)")
    print(f"  prover                   {prover_s:.2f} s")
    print(f"  baseline bare GEMMs      {gemm_s:.2f} s  -> overhead {prover_s / gemm_s:.2f}x")
    print(
        f"  baseline fill + GEMMs    {fill_gemm_s:.2f} s  -> overhead "
        f"{prover_s / fill_gemm_s:.2f}x (goal <= 1.15x)"
    )
    print(
        f"  quarter of memory kept   {partial_s:.2f} s  -> {partial_s / honest_cpu_s:.2f}x "
        "the honest CPU prover (window rejects > 1.7x)"
    )
    print(f"  verifier CPU             {verifier_cpu:.3f} s  (goal < 2 s)")
    print(f"  bytes exchanged          {sent / 1e6:.2f} MB  (goal < 10 MB)")
    print(f"  80 GB H100, computed     {h100_bytes / 1e6:.2f} MB, {h100.steps} steps")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
