"""Hardware: what this machine really delivers, CPU to GPU, measured."""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import tempfile

import numpy as np
import psutil
import pynvml

from gpuprovider.check.context import CheckContext
from gpuprovider.check.measure import (
    best_rate,
    cuda_rate,
    gpu_result,
    no_gpus,
    nvml,
    on_gpu,
    per_cuda_gpu,
    per_gpu,
)
from gpuprovider.check.registry import check
from gpuprovider.check.result import Result, Status, graded
from gpuprovider.domain.records import GpuRecord
from gpuprovider.proof import calibration
from gpuprovider.proof.calibration import Calibration

MIB, GIB = 2**20, 2**30
MEMORY_BANDWIDTH_WARN_GBS = 5.0
DISK_WARN_MBS = 200.0
VRAM_ALLOCATABLE_PCT = 95.0
MAX_TEMPERATURE_C, WARN_TEMPERATURE_C = 90, 83
H2D_PASS_GBS, H2D_WARN_GBS = 10.0, 5.0  # PCIe 3 x16 delivers ~12 GB/s, PCIe 4 ~25
CORES_PER_GPU = 2


@check("hardware", "cpu", "CPU cores and throughput")
def cpu(ctx: CheckContext) -> list[Result]:
    cores = psutil.cpu_count() or 1
    need = max(2, CORES_PER_GPU * len(ctx.gpus))
    n = max(256, int(1024 * ctx.scale**0.5))
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    gflops, spread = best_rate(lambda: a @ a, 2 * n**3 / 1e9)
    ok = cores >= need
    return [
        Result.judged(
            ok,
            Status.WARN,
            cores,
            "cores",
            threshold=f">= {need} cores ({CORES_PER_GPU} per GPU)",
            advice="tasks need CPU to feed their GPUs; give each GPU 2 cores",
            name="cpu-cores",
        ),
        Result(
            Status.PASS,
            round(gflops, 1),
            "GFLOPS",
            threshold="fp32 GEMM, all cores (figure for the report)",
            name="cpu-gemm",
            data={"spread_pct": round(spread, 2), "n": n},
        ),
    ]


@check("hardware", "memory-bandwidth", "Memory bandwidth")
def memory_bandwidth(ctx: CheckContext) -> Result:
    size = max(16 * MIB, int(256 * MIB * ctx.scale))
    src = np.ones(size, dtype=np.uint8)
    dst = np.empty_like(src)
    rate, spread = best_rate(lambda: np.copyto(dst, src), 2 * size / 1e9)
    return Result(
        graded(rate, pass_at=MEMORY_BANDWIDTH_WARN_GBS),
        round(rate, 2),
        "GB/s",
        threshold=f">= {MEMORY_BANDWIDTH_WARN_GBS} GB/s (copy, read + write)",
        advice=""
        if rate >= MEMORY_BANDWIDTH_WARN_GBS
        else "check that every memory channel is populated and the memory runs at its rated speed",
        data={"spread_pct": round(spread, 2)},
    )


@check("hardware", "disk", "Sequential disk write and read")
def disk(ctx: CheckContext) -> list[Result]:
    size = max(16 * MIB, int(512 * MIB * ctx.scale))
    block = np.random.default_rng(0).integers(0, 255, 4 * MIB, dtype=np.uint8).tobytes()
    blocks = size // len(block)
    fd, path = tempfile.mkstemp(prefix=".gpuprovider-check-", dir=ctx.data_dir)
    try:

        def write() -> None:
            os.lseek(fd, 0, os.SEEK_SET)
            for _ in range(blocks):
                os.write(fd, block)
            os.fsync(fd)

        def read() -> None:
            with contextlib.suppress(AttributeError, OSError):  # not on every OS
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read the disk, not cache
            os.lseek(fd, 0, os.SEEK_SET)
            while os.read(fd, len(block)):
                pass

        amount = blocks * len(block) / 1e6
        results = []
        for name, work in (("disk-write", write), ("disk-read", read)):
            rate, spread = best_rate(work, amount, reps=3)
            ok = rate >= DISK_WARN_MBS
            results.append(
                Result.judged(
                    ok,
                    Status.WARN,
                    round(rate, 1),
                    "MB/s",
                    threshold=f">= {DISK_WARN_MBS:.0f} MB/s",
                    advice=f"{ctx.data_dir} is slow; put the provider's home on "
                    "an SSD: images and models load from it",
                    name=name,
                    data={"path": str(ctx.data_dir), "spread_pct": round(spread, 2)},
                )
            )
        return results
    finally:
        os.close(fd)
        os.unlink(path)


@check("hardware", "gpus", "GPUs present as configured", gpu=True)
def gpus_present(ctx: CheckContext) -> Result:
    expected: dict[str, int] = {}
    for entry in ctx.config.inventory.expected_gpus:
        expected[entry.model] = expected.get(entry.model, 0) + entry.count
    found: dict[str, int] = {}
    for gpu in ctx.gpus:
        found[gpu.model] = found.get(gpu.model, 0) + 1
    shown = ", ".join(f"{n} x {m}" for m, n in sorted(found.items())) or "none"
    simulated = sum(g.count for g in ctx.config.inventory.simulated_gpus)
    note = f" (+{simulated} simulated, not measured)" if simulated else ""
    if not expected:
        if not found:
            return Result(
                Status.SKIP,
                "none" + note,
                advice=f"no NVIDIA GPU found ({ctx.report.unavailable_reason or 'none reported'})",
            )
        return Result(Status.PASS, shown + note, threshold="no [[inventory.expected_gpus]]")
    mismatches = [
        f"expected {n} x {model}, found {found.get(model, 0)}"
        for model, n in sorted(expected.items())
        if found.get(model, 0) != n
    ]
    mismatches += [
        f"found {n} x {model}, not expected"
        for model, n in sorted(found.items())
        if model not in expected
    ]
    return Result(
        Status.FAIL if mismatches else Status.PASS,
        shown + note,
        threshold=", ".join(f"{n} x {m}" for m, n in sorted(expected.items())),
        advice="; ".join(mismatches)
        + (
            "; reseat or replace the missing card, or fix [[inventory.expected_gpus]]"
            if mismatches
            else ""
        ),
    )


def _ecc(gpu: GpuRecord) -> Result:
    handle = pynvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
    try:
        current, _pending = pynvml.nvmlDeviceGetEccMode(handle)
    except pynvml.NVMLError_NotSupported:
        return gpu_result(gpu, Status.SKIP, advice="this GPU has no ECC")
    if not current:
        return gpu_result(gpu, Status.WARN, "ECC off", advice="enable ECC: nvidia-smi -e 1")
    counts = {
        kind: pynvml.nvmlDeviceGetTotalEccErrors(handle, error, pynvml.NVML_AGGREGATE_ECC)
        for kind, error in (
            ("uncorrected", pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
            ("corrected", pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED),
        )
    }
    remap_failed = False
    with contextlib.suppress(pynvml.NVMLError):
        *_rows, _pending_remap, remap_failed = pynvml.nvmlDeviceGetRemappedRows(handle)
    if counts["uncorrected"] or remap_failed:
        status = Status.FAIL
        advice = "uncorrectable memory errors: take the GPU out of service and have it replaced"
    elif counts["corrected"]:
        status = Status.WARN
        advice = "corrected memory errors: watch the count; a rising count means a failing card"
    else:
        status, advice = Status.PASS, ""
    return gpu_result(
        gpu,
        status,
        f"{counts['uncorrected']} uncorrected, {counts['corrected']} corrected",
        threshold="0 uncorrected, row remapping not failed",
        advice=advice,
        data=counts | {"remap_failed": bool(remap_failed)},
    )


@check("hardware", "ecc", "GPU ECC errors", gpu=True)
def ecc(ctx: CheckContext) -> list[Result]:
    if not ctx.gpus:
        return no_gpus(ctx)
    with nvml():
        return per_gpu(ctx, _ecc)


# Throttle reasons that mean the card is held back by something wrong (heat, power
# delivery); idle and application-clock reasons are normal.
_BAD_THROTTLE = {
    "hw_slowdown": 0x8,
    "sw_thermal": 0x20,
    "hw_thermal": 0x40,
    "hw_power_brake": 0x80,
}


def _health(gpu: GpuRecord) -> Result:
    handle = pynvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
    reasons = pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle)
    temp = pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
    power = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000
    limit = pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000
    bad = [name for name, bit in _BAD_THROTTLE.items() if reasons & bit]
    problems = []
    status = Status.PASS
    if bad:
        status = Status.WARN
        problems.append(f"throttled ({', '.join(bad)}): check cooling and power cables")
    if temp >= MAX_TEMPERATURE_C:
        status = Status.FAIL
        problems.append("too hot: fix airflow before selling this GPU")
    elif temp >= WARN_TEMPERATURE_C:
        status = Status.WARN
        problems.append("running hot: check fans and airflow")
    return gpu_result(
        gpu,
        status,
        f"{temp} °C, {power:.0f}/{limit:.0f} W",
        threshold=f"< {WARN_TEMPERATURE_C} °C, no thermal or power throttling",
        advice="; ".join(problems),
        data={"temperature_c": temp, "power_w": power, "power_limit_w": limit, "throttle": bad},
    )


@check("hardware", "gpu-health", "GPU throttling, temperature and power", gpu=True)
def gpu_health(ctx: CheckContext) -> list[Result]:
    if not ctx.gpus:
        return no_gpus(ctx)
    with nvml():
        return per_gpu(ctx, _health)


@check("hardware", "vram", "VRAM allocatable", gpu=True)
def vram(ctx: CheckContext) -> list[Result]:
    torch, _ = ctx.torch

    def fill(gpu: GpuRecord, index: int) -> Result:
        assert torch is not None  # per_cuda_gpu measures only where PyTorch sees a GPU
        free, total = torch.cuda.mem_get_info(index)
        chunk = 256 * MIB
        held = []
        try:
            while True:
                try:
                    block = torch.empty(chunk, dtype=torch.uint8, device=index)
                except torch.cuda.OutOfMemoryError:
                    if chunk <= 2 * MIB:
                        break
                    chunk //= 2
                    continue
                block.fill_(0xA5)  # touch it: allocated memory must be usable memory
                held.append(block)
            allocated = sum(b.numel() for b in held)
            torch.cuda.synchronize(index)
            readable = all(int(b[-1]) == 0xA5 for b in held[:: max(1, len(held) // 16)])
        finally:
            held.clear()
        pct = 100 * allocated / total
        ok = pct >= VRAM_ALLOCATABLE_PCT and readable
        return Result.judged(
            ok,
            Status.FAIL,
            round(pct, 2),
            "%",
            **on_gpu(gpu),
            threshold=f">= {VRAM_ALLOCATABLE_PCT:.0f} % of {total / GIB:.1f} GiB",
            advice="memory that cannot be allocated is memory a renter pays "
            "for and cannot use: stop other processes on the GPU or replace it",
            data={
                "allocated_gib": round(allocated / GIB, 2),
                "total_gib": round(total / GIB, 2),
                "free_before_gib": round(free / GIB, 2),
            },
        )

    return per_cuda_gpu(ctx, fill)


@check("hardware", "host-device", "Host to device bandwidth", gpu=True)
def host_device(ctx: CheckContext) -> list[Result]:
    torch, _ = ctx.torch

    def copy(gpu: GpuRecord, index: int) -> Result:
        assert torch is not None  # per_cuda_gpu measures only where PyTorch sees a GPU
        size = max(64 * MIB, int(1 * GIB * ctx.scale))
        host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        device = torch.empty(size, dtype=torch.uint8, device=index)
        h2d, spread = cuda_rate(torch, lambda: device.copy_(host, non_blocking=True), size / 1e9)
        d2h, _ = cuda_rate(torch, lambda: host.copy_(device, non_blocking=True), size / 1e9)
        return gpu_result(
            gpu,
            graded(min(h2d, d2h), pass_at=H2D_PASS_GBS, warn_at=H2D_WARN_GBS),
            round(h2d, 2),
            "GB/s",
            threshold=f">= {H2D_PASS_GBS:.0f} GB/s each way ({H2D_WARN_GBS:.0f} to warn)",
            advice=""
            if min(h2d, d2h) >= H2D_PASS_GBS
            else "the GPU's PCIe link is slow: "
            "check it sits in a x16 slot at full generation (nvidia-smi -q | grep -A3 Link)",
            data={"h2d_gbs": round(h2d, 2), "d2h_gbs": round(d2h, 2), "spread_pct": spread},
        )

    return per_cuda_gpu(ctx, copy)


@check("hardware", "peer", "GPU to GPU bandwidth", gpu=True)
def peer(ctx: CheckContext) -> list[Result]:
    torch, why = ctx.torch
    if len(ctx.gpus) < 2:
        return [Result(Status.SKIP, advice="fewer than two GPUs")]
    if why:
        return [Result(Status.SKIP, advice=why)]
    assert torch is not None  # no reason why not: PyTorch is there
    size = max(64 * MIB, int(1 * GIB * ctx.scale))
    results = []
    for a, b in itertools.combinations(ctx.gpus, 2):
        ia, ib = ctx.cuda_index(a), ctx.cuda_index(b)
        subject = f"GPU {a.idx}<->{b.idx}"
        if ia is None or ib is None:
            results.append(Result(Status.SKIP, subject=subject, advice="PyTorch misses a GPU"))
            continue
        src = torch.empty(size, dtype=torch.uint8, device=ia)
        dst = torch.empty(size, dtype=torch.uint8, device=ib)
        rate, spread = cuda_rate(torch, functools.partial(dst.copy_, src), size / 1e9)
        p2p = torch.cuda.can_device_access_peer(ia, ib)
        del src, dst
        results.append(
            Result(
                graded(rate, pass_at=H2D_PASS_GBS, warn_at=H2D_WARN_GBS),
                round(rate, 2),
                "GB/s",
                threshold=f">= {H2D_PASS_GBS:.0f} GB/s",
                advice=""
                if p2p
                else "no peer access between these GPUs: multi-GPU jobs "
                "go through host memory; enable P2P (IOMMU passthrough, ACS off) or use NVLink",
                subject=subject,
                data={"p2p": p2p, "spread_pct": spread},
            )
        )
    torch.cuda.empty_cache()
    return results


@check("hardware", "proof-calibration", "Proof-of-GPU timing calibration per GPU", gpu=True)
def proof_calibration(ctx: CheckContext) -> list[Result]:
    """Whether a verifier can time each GPU's proof against a measured walk time, or only
    against one estimated from published bandwidth (which verifiers must opt into)."""
    results = []
    for gpu in ctx.gpus:
        kind = calibration.kind_of(gpu.model)
        subject = f"GPU {gpu.idx}"
        if kind is None:
            results.append(
                Result(
                    Status.WARN,
                    "not in the catalogue",
                    subject=subject,
                    gpu_uuid=gpu.uuid,
                    advice="no verifier can prove this model; add it to the GPU catalogue",
                )
            )
            continue
        results.append(
            Result(
                Status.PASS if kind is Calibration.MEASURED else Status.WARN,
                str(kind),
                subject=subject,
                threshold="measured (bench/gpu.sh); estimated counts only where verifiers opt in",
                advice=""
                if kind is Calibration.MEASURED
                else f"run bench/gpu.sh on this {gpu.model} and add its calibration entry",
            )
        )
    if not results:
        return [Result(Status.SKIP, advice="no NVIDIA GPU to prove")]
    return results
