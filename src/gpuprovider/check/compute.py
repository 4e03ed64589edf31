"""Compute: GEMM throughput per dtype and device memory bandwidth, against the catalogue."""

from __future__ import annotations

import contextlib

from gpuprovider.check.context import CheckContext
from gpuprovider.check.measure import cuda_rate, gpu_result, per_cuda_gpu
from gpuprovider.check.registry import check
from gpuprovider.check.result import Result, Status, graded
from gpuprovider.domain.records import GpuRecord

DTYPES = ("bf16", "fp16", "tf32", "int8")
# A healthy card reaches 60-85 % of its datasheet peak on a large square GEMM and
# 75-90 % of its memory bandwidth on a copy; well below that, something is wrong.
GEMM_PASS_PCT, GEMM_WARN_PCT = 50.0, 30.0
BANDWIDTH_PASS_PCT, BANDWIDTH_WARN_PCT = 60.0, 40.0


@contextlib.contextmanager
def _tf32(torch, enabled: bool):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def gemm_rate(torch, dtype: str, n: int, device: int) -> tuple[float, float]:
    """(TFLOPS or TOPS, spread %) of an n x n x n GEMM in `dtype` on `device`."""
    if dtype == "int8":
        a = torch.randint(-128, 127, (n, n), dtype=torch.int8, device=device)
        b = torch.randint(-128, 127, (n, n), dtype=torch.int8, device=device)

        def work() -> None:
            torch._int_mm(a, b)
    else:
        kind = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32}[dtype]
        a = torch.randn(n, n, dtype=kind, device=device)
        b = torch.randn(n, n, dtype=kind, device=device)

        def work() -> None:
            torch.matmul(a, b)

    reps = 10

    def batch() -> None:
        for _ in range(reps):
            work()

    with _tf32(torch, dtype == "tf32"):
        return cuda_rate(torch, batch, reps * 2 * n**3 / 1e12)


def pct_status(pct: float | None, pass_at: float, warn_at: float) -> Status:
    return Status.PASS if pct is None else graded(pct, pass_at=pass_at, warn_at=warn_at)


@check("compute", "gemm", "GEMM throughput per dtype", gpu=True)
def gemm(ctx: CheckContext) -> list[Result]:
    torch, _ = ctx.torch
    n = max(1024, int(8192 * ctx.scale**0.5) // 256 * 256)

    def measure(gpu: GpuRecord, index: int) -> list[Result]:
        model = ctx.model(gpu)
        results = []
        for dtype in DTYPES:
            peak = model.peak.get(dtype) if model else None
            unit = "TOPS" if dtype == "int8" else "TFLOPS"
            if model and peak is None:
                results.append(
                    gpu_result(
                        gpu,
                        Status.SKIP,
                        name=f"gemm-{dtype}",
                        unit=unit,
                        advice=f"{model.id} has no {dtype} tensor path",
                    )
                )
                continue
            rate, spread = gemm_rate(torch, dtype, n, index)
            pct = 100 * rate / peak if peak else None
            status = pct_status(pct, GEMM_PASS_PCT, GEMM_WARN_PCT)
            results.append(
                gpu_result(
                    gpu,
                    status,
                    round(rate, 1),
                    unit,
                    name=f"gemm-{dtype}",
                    threshold=f">= {GEMM_PASS_PCT:.0f} % of {peak:g} peak"
                    if peak
                    else "model not in the catalogue: no peak to compare",
                    advice=""
                    if status is Status.PASS
                    else "far below the datasheet: check "
                    "clocks (nvidia-smi -q -d CLOCK), power limit and throttling",
                    data={
                        "dtype": dtype,
                        "pct_of_peak": round(pct, 1) if pct else None,
                        "peak": peak,
                        "spread_pct": round(spread, 2),
                        "n": n,
                    },
                )
            )
        return results

    return per_cuda_gpu(ctx, measure)


@check("compute", "device-memory", "Device memory bandwidth", gpu=True)
def device_memory(ctx: CheckContext) -> list[Result]:
    torch, _ = ctx.torch
    size = max(256 * 2**20, int(2 * 2**30 * ctx.scale))

    def measure(gpu: GpuRecord, index: int) -> Result:
        assert torch is not None  # per_cuda_gpu measures only where PyTorch sees a GPU
        src = torch.empty(size, dtype=torch.uint8, device=index)
        dst = torch.empty_like(src)
        rate, spread = cuda_rate(torch, lambda: dst.copy_(src), 2 * size / 1e9, reps=10)
        model = ctx.model(gpu)
        pct = 100 * rate / model.bandwidth_gbs if model else None
        status = pct_status(pct, BANDWIDTH_PASS_PCT, BANDWIDTH_WARN_PCT)
        return gpu_result(
            gpu,
            status,
            round(rate, 1),
            "GB/s",
            threshold=f">= {BANDWIDTH_PASS_PCT:.0f} % of {model.bandwidth_gbs:g} GB/s"
            if model
            else "model not in the catalogue: no figure to compare",
            advice=""
            if status is Status.PASS
            else "memory runs below its rating: check memory clocks and ECC errors",
            data={"pct_of_peak": round(pct, 1) if pct else None, "spread_pct": round(spread, 2)},
        )

    return per_cuda_gpu(ctx, measure)
