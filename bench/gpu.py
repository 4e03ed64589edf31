"""Every GPU path the project has, in one run, for a machine with NVIDIA GPUs (and, on
one without, everything it can, saying exactly what it skipped):

  nvml          the inventory NVML gives (models normalised through the catalogue)
  telemetry     one NVML sample per GPU: utilisation, memory, temperature, power, ECC,
                retired pages, remapped rows, throttling, PCIe and NVLink counters
  check         `gpuprovider check`, full suite, with its HTML report
  identity      the CPU (numpy) and GPU (PyTorch, cuda:0) provers commit bit-identically
  proof         proof of GPU on cuda:0 with a GPU's parameters over GPP_PROOF_GIB (16)
                GiB of its memory (the walk's cost per step does not depend on how much
                is filled), proved and verified; fill throughput measured
  calibration   the walk's time measured against its seeded model: a
                proof/calibration.toml entry to paste
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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gpuprovider.identity.keys import public_key_hex
from gpuprovider.inventory.local import read_nvml
from gpuprovider.proof import calibration
from gpuprovider.proof import protocol as P
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


def _prove(memory_bytes: int, backend: Any) -> tuple[Any, float, float, Any]:
    """(params, fill seconds, walk seconds, verdict) for one honest proof."""
    key = Ed25519PrivateKey.generate()
    params = gpu_params(memory_bytes)
    challenge = new_challenge(
        "GPU-bench-" + secrets.token_hex(4), "bench", public_key_hex(key), params
    )
    prover, nonce = Prover(challenge, backend), new_nonce()
    fill_s = prover.fill()
    began = time.perf_counter()
    commitment = prover.walk(nonce)
    elapsed = time.perf_counter() - began
    prover.release()
    commitment.signature = key.sign(
        P.commitment_digest(challenge.id, nonce, commitment.roots)
    ).hex()
    wanted = pick_openings(params)
    verdict = verify(challenge, commitment, wanted, prover.open(wanted), elapsed, None)
    return params, fill_s, elapsed, verdict


def _walk(challenge, backend, nonce: str) -> bytes:
    prover = Prover(challenge, backend)
    prover.fill()
    return prover.walk(nonce).roots


def step_identity(out: Path, state: dict) -> dict:
    t = cuda()
    key = Ed25519PrivateKey.generate()
    params = gpu_params(64 * 2**20)
    challenge = new_challenge("GPU-identity", "bench", public_key_hex(key), params)
    nonce = new_nonce()
    on_cpu = _walk(challenge, NumpyBackend(), nonce)
    on_gpu = _walk(challenge, TorchBackend(t, "cuda:0"), nonce)
    same = on_cpu == on_gpu
    if not same:
        raise RuntimeError("the CPU and GPU provers committed different roots")
    return {"memory_mib": 64, "roots": len(on_cpu) // 32, "bit_identical": same}


def step_proof(out: Path, state: dict) -> dict:
    t = cuda()
    free, total = t.cuda.mem_get_info(0)
    wanted = float(os.environ.get("GPP_PROOF_GIB", "16")) * 2**30
    memory = int(min(wanted, free * 0.97 / P.FILL_FRACTION))
    params, fill_s, elapsed, verdict = _prove(memory, TorchBackend(t, "cuda:0"))
    state["proof"] = (params, elapsed)
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
        "walk_s": round(elapsed, 3),
        "walk_steps": params.steps,
        "verdict": verdict.to_dict(),
    }


def step_calibration(out: Path, state: dict) -> dict:
    if "proof" not in state:
        raise Skipped("no GPU proof ran")
    gpus = state.get("gpus") or []
    if not gpus:
        raise Skipped("NVML named no GPU model")
    model = gpus[0].model
    params, elapsed = state["proof"]
    seeded = calibration.expected(model, params)
    if seeded is None:
        raise Skipped(f"{model} is not in the catalogue")
    entry = calibration.measured().get(model)
    modelled = seeded.seconds / (entry or {}).get("scale", 1.0)
    scale = elapsed / modelled
    source = (
        f"bench/gpu.sh on {gpus[0].device_name}, driver {state.get('driver', '?')}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    bandwidth = (entry or {}).get("effective_gbs") or calibration.catalogue.models()[
        model
    ].bandwidth_gbs * calibration.EFFICIENCY
    toml = (
        f'[[gpu]]\nmodel = "{model}"\neffective_gbs = {bandwidth:.0f}\n'
        f'scale = {scale:.3f}\nsource = "{source}"\n'
    )
    (out / "calibration.toml").write_text(toml)
    return {
        "model": model,
        "measured_s": round(elapsed, 2),
        "modelled_s": round(modelled, 2),
        "scale": round(scale, 3),
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
