"""Timing helpers shared by the hardware and compute checks."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TypedDict

import pynvml

from gpuprovider.check.context import CheckContext
from gpuprovider.check.result import Result, Status
from gpuprovider.domain.records import GpuRecord


def best_rate(work: Callable[[], object], amount: float, reps: int = 10) -> tuple[float, float]:
    """Run `work` `reps` times after one warm-up: (best amount/s, spread in %).

    The best run, as STREAM reports it: what the hardware delivers when nothing else
    competes; the median moves with whatever else the machine is doing."""
    work()
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        work()
        rates.append(amount / (time.perf_counter() - t0))
    best = max(rates)
    return best, 100 * (best - min(rates)) / best


def cuda_rate(
    torch, work: Callable[[], None], amount: float, reps: int = 10
) -> tuple[float, float]:
    """As `best_rate` for GPU work: synchronised so the kernels are inside the timing."""

    def synced() -> None:
        work()
        torch.cuda.synchronize()

    return best_rate(synced, amount, reps)


@contextlib.contextmanager
def nvml() -> Iterator[None]:
    pynvml.nvmlInit()
    try:
        yield
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


class OnGpu(TypedDict):
    subject: str
    gpu_uuid: str


def on_gpu(gpu: GpuRecord) -> OnGpu:
    """The fields that tie a result to one GPU (a FAIL there keeps work off that GPU)."""
    return {"subject": f"GPU {gpu.idx}", "gpu_uuid": gpu.uuid}


def gpu_result(gpu: GpuRecord, status: Status, value=None, unit: str = "", **fields) -> Result:
    return Result(status, value, unit, **on_gpu(gpu), **fields)


def no_gpus(ctx: CheckContext) -> list[Result]:
    """The single SKIP a per-GPU check gives on a machine without NVIDIA GPUs."""
    reason = ctx.report.unavailable_reason or "the NVIDIA driver reports no GPU"
    return [Result(Status.SKIP, advice=f"no NVIDIA GPU to measure ({reason})")]


def per_gpu(
    ctx: CheckContext, measure: Callable[[GpuRecord], Result | list[Result]]
) -> list[Result]:
    """Run `measure` on each GPU; one GPU's error is that GPU's FAIL, the others go on."""
    if not ctx.gpus:
        return no_gpus(ctx)
    results: list[Result] = []
    for gpu in ctx.gpus:
        try:
            found = measure(gpu)
        except Exception as exc:
            found = gpu_result(gpu, Status.FAIL, advice=f"{type(exc).__name__}: {exc}")
        results.extend([found] if isinstance(found, Result) else found)
    return results


def per_cuda_gpu(ctx: CheckContext, measure: Callable[[GpuRecord, int], Result | list[Result]]):
    """`per_gpu` for measurements that need PyTorch on the GPU (SKIP, saying why, if not)."""
    torch, why = ctx.torch
    if ctx.gpus and why:
        return [Result(Status.SKIP, advice=why)]

    def on_device(gpu: GpuRecord) -> Result | list[Result]:
        assert torch is not None  # no reason why not (or no GPU to measure)
        index = ctx.cuda_index(gpu)
        if index is None:
            return gpu_result(gpu, Status.SKIP, advice="PyTorch does not see this GPU")
        with torch.cuda.device(index):
            try:
                return measure(gpu, index)
            finally:
                torch.cuda.empty_cache()

    return per_gpu(ctx, on_device)
