"""Every GPU path the project has, in one run, for a machine with NVIDIA GPUs (and, on
one without, everything it can, saying exactly what it skipped):

  nvml          the inventory NVML gives (models normalised through the catalogue)
  telemetry     one NVML sample per GPU: utilisation, memory, temperature, power, ECC,
                retired pages, remapped rows, throttling, PCIe and NVLink counters
  check         `gpuprovider check`, full suite, with its HTML report
  identity      the CPU prover (native kernels) and the GPU's (PyTorch, and the fused
                Triton kernels) commit bit-identically
  proof         proof of GPU on cuda:0 with a GPU's parameters over GPP_PROOF_GIB (16)
                GiB of its memory (the walk's cost per step does not depend on how much
                is filled), proved and verified; fill throughput measured
  calibration   the walk's measured bandwidth, host step cost and spread over 5
                repeats: a proof/calibration.toml entry to paste
  tradeoff      bench/proof.py on cuda:0 over 2 GiB: provers keeping 90 % and 50 % of
                memory against the honest one
  metrics       a daemon on this machine, /metrics scraped with its GPU telemetry

Usage: python bench/gpu.py OUT_DIR   (bench/gpu.sh runs it)
Writes OUT_DIR/gpu.json, OUT_DIR/check.html, OUT_DIR/calibration.toml (when a GPU
proved); prints a summary, then JSON on the last line.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gpuprovider.domain import catalogue
from gpuprovider.identity.keys import public_key_hex
from gpuprovider.inventory.local import read_nvml
from gpuprovider.proof import bounds, calibration, native
from gpuprovider.proof import protocol as P
from gpuprovider.proof.gpu_kernels import cuda_backend
from gpuprovider.proof.prover import NumpyBackend, Prover, TorchBackend
from gpuprovider.proof.remote import gpu_params
from gpuprovider.proof.verifier import new_challenge, new_nonce, pick_openings, verify
from gpuprovider.telemetry.gpus import poll_gpus
from gpuprovider.testing import GPUPROVIDER, Provider, free_port, make_home, wait_for, watch_home

try:
    import torch
except ImportError:  # torch is optional: the GPU prover paths are then skipped
    torch = None


class Skipped(Exception):
    """This step cannot run here; the message says why."""


def cuda() -> Any:
    if torch is None:
        raise Skipped("PyTorch is not installed (pip install 'gpuprovider[gpu]')")
    if not torch.cuda.is_available():
        raise Skipped("PyTorch sees no CUDA device")
    return torch


def step_nvml(out: Path, state: dict) -> dict:
    report = read_nvml("bench")
    if not report.gpus:
        raise Skipped(report.unavailable_reason or "NVML reports no GPU")
    state["gpus"] = report.gpus
    return {
        "driver": report.driver_version,
        "cuda": report.cuda_version,
        "gpus": [
            {
                "index": g.idx,
                "uuid": g.uuid,
                "name": g.device_name,
                "model": g.model,
                "memory_mib": g.memory_mib,
            }
            for g in report.gpus
        ],
        "unreadable": report.unavailable_reason,
    }


def step_telemetry(out: Path, state: dict) -> dict:
    began = time.perf_counter()
    poll = poll_gpus()
    took = time.perf_counter() - began
    if not poll.samples:
        raise Skipped(poll.error or "NVML reports no GPU")
    samples = [s.to_dict() for s in poll.samples]
    unsupported = sorted({k for s in samples for k, v in s.items() if v in (None, {})})
    return {"poll_s": round(took, 4), "samples": samples, "not_supported": unsupported}


def step_check(out: Path, state: dict) -> dict:
    with tempfile.TemporaryDirectory() as home:
        done = subprocess.run(
            [
                GPUPROVIDER,
                "--home",
                str(Path(home) / "none"),
                "check",
                "--json",
                "--report",
                str(out / "check.html"),
            ],
            capture_output=True,
            text=True,
            timeout=420,
        )
    if not done.stdout.strip():
        raise RuntimeError(f"check printed nothing: {done.stderr[-2000:]}")
    data = json.loads(done.stdout)
    results = data.get("results", [])
    counts: dict[str, int] = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {
        "exit_code": done.returncode,
        "wall_s": data.get("wall_s"),
        "counts": counts,
        "failed": [
            f"{r['group']}/{r['name']}: {r.get('advice', '')}"
            for r in results
            if r["status"] == "FAIL"
        ],
        "report": str(out / "check.html"),
    }


WALK_REPEATS = 5


def _rounds(state: dict) -> int:
    """The rounds a verifier asks of this machine's first GPU model."""
    gpus = state.get("gpus") or []
    model = catalogue.models().get(gpus[0].model) if gpus else None
    return bounds.rounds_for(model) if model else bounds.ROUNDS_MIN


def _prove(memory_bytes: int, backend: Any, rounds: int) -> tuple[Any, float, list, Any]:
    """(params, fill seconds, walk seconds of each repeat, verdict) for an honest proof."""
    key = Ed25519PrivateKey.generate()
    params = gpu_params(memory_bytes, rounds)
    challenge = new_challenge(
        "GPU-bench-" + secrets.token_hex(4), "bench", public_key_hex(key), params
    )
    prover = Prover(challenge, backend)
    fill_s = prover.fill()
    walks = []
    for _ in range(WALK_REPEATS):  # the spread the timing window must cover
        nonce = new_nonce()
        began = time.perf_counter()
        commitment = prover.walk(nonce)
        walks.append(time.perf_counter() - began)
    elapsed = walks
    prover.release()
    commitment.signature = key.sign(
        P.commitment_digest(challenge.id, nonce, commitment.roots)
    ).hex()
    wanted = pick_openings(params)
    verdict = verify(challenge, commitment, wanted, prover.open(wanted), elapsed[-1], None)
    return params, fill_s, elapsed, verdict


def _walk(challenge, backend, nonce: str) -> bytes:
    prover = Prover(challenge, backend)
    prover.fill()
    return prover.walk(nonce).roots


def step_identity(out: Path, state: dict) -> dict:
    t = cuda()
    key = Ed25519PrivateKey.generate()
    params = P.Params(1024, 64, 16, 256, 4, _rounds(state), 5)  # the GPU's n, w and rounds
    challenge = new_challenge("GPU-identity", "bench", public_key_hex(key), params)
    nonce = new_nonce()
    on_cpu = _walk(challenge, NumpyBackend(), nonce)
    found = {"memory_mib": 256, "roots": len(on_cpu) // 32, "cpu_kernel": native.kernel()}
    gpu_backends = [("torch", TorchBackend(t, "cuda:0")), ("triton", cuda_backend(t, "cuda:0"))]
    for name, backend in gpu_backends:
        if backend.name != name:
            found[name] = "not available"
            continue
        if _walk(challenge, backend, nonce) != on_cpu:
            raise RuntimeError(f"the CPU and the GPU's {name} prover committed different roots")
        found[name] = "bit-identical"
    return found


def step_proof(out: Path, state: dict) -> dict:
    t = cuda()
    free, total = t.cuda.mem_get_info(0)
    wanted = float(os.environ.get("GPP_PROOF_GIB", "16")) * 2**30
    memory = int(min(wanted, free * 0.97 / P.FILL_FRACTION))
    backend = cuda_backend(t, "cuda:0")
    params, fill_s, walks, verdict = _prove(memory, backend, _rounds(state))
    elapsed = sorted(walks)[len(walks) // 2]
    state["proof"] = (params, walks)
    if not verdict.passed:
        raise RuntimeError(f"the honest proof failed: {verdict.reason}")
    fill_gbs = params.covered_bytes / fill_s / 1e9
    return {
        "device": t.cuda.get_device_name(0),
        "memory_total_bytes": total,
        "memory_proved_bytes": params.covered_bytes,
        "fill_s": round(fill_s, 2),
        "fill_gbs": round(fill_gbs, 2),
        "full_memory_fill_s_extrapolated": round(0.9 * total / 1e9 / fill_gbs, 1),
        "prover": backend.name,
        "walk_s": round(elapsed, 3),
        "walk_s_all": [round(w, 4) for w in walks],
        "walk_spread_pct": round(100 * (max(walks) - min(walks)) / elapsed, 2),
        "walk_read_gbs": round(
            params.steps * params.reads_per_step * params.matrix_bytes / elapsed / 1e9, 1
        ),
        "walk_steps": params.steps,
        "verdict": verdict.to_dict(),
    }


def _host_step_s(params: Any) -> float:
    """What one step costs on the host, measured: the state's Merkle root and the next
    step's indices (the GPU's part is the rest of the walk)."""
    state = np.random.default_rng(0).integers(-128, 128, (params.m, params.n), dtype=np.int8)
    began = time.perf_counter()
    for step in range(1, 11):
        P.indices(P.merkle_root(step, state), step, params)
    return (time.perf_counter() - began) / 10


def step_calibration(out: Path, state: dict) -> dict:
    if "proof" not in state:
        raise Skipped("no GPU proof ran")
    gpus = state.get("gpus") or []
    if not gpus:
        raise Skipped("NVML named no GPU model")
    model = gpus[0].model
    if model not in catalogue.models():
        raise Skipped(f"{model} is not in the catalogue")
    params, walks = state["proof"]
    median = sorted(walks)[len(walks) // 2]
    spread = 100 * (max(walks) - min(walks)) / median
    step_s = _host_step_s(params)
    reads = params.steps * params.reads_per_step * params.matrix_bytes
    effective = reads / max(1e-9, median - params.steps * step_s) / 1e9
    estimated = calibration.expected(model, params)
    source = (
        f"bench/gpu.sh on {gpus[0].device_name}, driver {state.get('driver', '?')}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    toml = (
        f'[[gpu]]\nmodel = "{model}"\neffective_gbs = {effective:.0f}\n'
        f'step_s = {step_s:.6f}\nspread_pct = {spread:.2f}\nsource = "{source}"\n'
    )
    (out / "calibration.toml").write_text(toml)
    return {
        "model": model,
        "measured_s": round(median, 3),
        "estimated_s": round(estimated.seconds, 3) if estimated else None,
        "spread_pct": round(spread, 2),
        "window_covers_spread": spread < calibration.MAX_SPREAD_PCT,
        "host_step_s": round(step_s, 6),
        "effective_gbs": round(effective, 1),
        "entry": toml,
    }


def step_tradeoff(out: Path, state: dict) -> dict:
    cuda()
    done = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("proof.py")),
            "--device",
            "cuda:0",
            "--memory-mib",
            "2048",
            "--keeps",
            "0.9,0.5",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    (out / "proof_tradeoff.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"bench/proof.py failed: {done.stderr[-1000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_metrics(out: Path, state: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        port = free_port()
        home = make_home(root / "home", port, gpus="")
        watch_home(home, "auto", interval_s=2.0)
        provider = Provider(home, port)
        provider.start_timeout_s = 60
        provider.start()
        try:
            headers = {"Authorization": f"Bearer {provider.token}"}

            def scraped() -> str:
                text = httpx.get(provider.url + "/metrics", headers=headers, timeout=30).text
                return (
                    "gpuprovider_gpu_sample_timestamp_seconds" in text or not state.get("gpus")
                ) and text

            text = wait_for(scraped, 30, "GPU telemetry in /metrics")
            began = time.perf_counter()
            httpx.get(provider.url + "/metrics", headers=headers, timeout=30)
            took = time.perf_counter() - began
        finally:
            provider.stop()
    utilisation = [
        line for line in text.splitlines() if line.startswith("gpuprovider_gpu_utilization_ratio{")
    ]
    (out / "metrics.txt").write_text(text)
    return {
        "scrape_ms": round(took * 1000, 1),
        "bytes": len(text),
        "gpus_with_telemetry": len(utilisation),
        "note": "" if utilisation else "no GPU telemetry: NVML gave no sample",
    }


STEPS = [
    ("nvml", step_nvml),
    ("telemetry", step_telemetry),
    ("check", step_check),
    ("identity", step_identity),
    ("proof", step_proof),
    ("calibration", step_calibration),
    ("tradeoff", step_tradeoff),
    ("metrics", step_metrics),
]


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    state: dict = {}
    result: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for name, step in STEPS:
        began = time.perf_counter()
        try:
            found = {"status": "ran", **step(out, state)}
        except Skipped as why:
            found = {"status": "skipped", "why": str(why)}
        except Exception as exc:  # one broken step never hides the others
            found = {
                "status": "failed",
                "why": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc()[-3000:],
            }
        if name == "nvml" and found["status"] == "ran":
            state["driver"] = found["driver"]
        found["took_s"] = round(time.perf_counter() - began, 1)
        result[name] = found
        print(f"{name:12} {found['status']:8} {found['took_s']:7.1f} s  {found.get('why', '')}")
    (out / "gpu.json").write_text(json.dumps(result, indent=2))
    brief = {
        k: {"status": v["status"], "why": v.get("why", "")} if isinstance(v, dict) else v
        for k, v in result.items()
    }
    print(json.dumps(brief))
    if any(isinstance(v, dict) and v["status"] == "failed" for v in result.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
