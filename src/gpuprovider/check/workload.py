"""Workload: a training step and an inference batch on each GPU, checked against the CPU."""

from __future__ import annotations

import copy
import time

from gpuprovider.check.context import CheckContext
from gpuprovider.check.measure import on_gpu, per_cuda_gpu
from gpuprovider.check.registry import check
from gpuprovider.check.result import Result, Status
from gpuprovider.domain.records import GpuRecord

# fp32 on both sides (TF32 off): the GPU and CPU results differ only by summation order.
TOLERANCE = 1e-4


def small_model(torch):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(256, 512),
        torch.nn.GELU(),
        torch.nn.LayerNorm(512),
        torch.nn.Linear(512, 512),
        torch.nn.GELU(),
        torch.nn.Linear(512, 10),
    )


def _train_and_infer(torch, model, x, y, device) -> tuple:
    """One SGD step on (x, y), then a forward pass: (weights after the step, logits)."""
    model = copy.deepcopy(model).to(device)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device))
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    with torch.no_grad():
        model.eval()
        logits = model(x.to(device)).cpu()
    weights = torch.cat([p.detach().cpu().flatten() for p in model.parameters()])
    return weights, logits


def compare_with_cpu(torch, device) -> dict[str, float]:
    """Largest relative difference between `device` and the CPU, training and inference."""
    model = small_model(torch)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(512, 256, generator=generator)
    y = torch.randint(0, 10, (512,), generator=generator)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        t0 = time.perf_counter()
        w_dev, out_dev = _train_and_infer(torch, model, x, y, device)
        elapsed = time.perf_counter() - t0
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    w_cpu, out_cpu = _train_and_infer(torch, model, x, y, "cpu")

    def rel(a, b) -> float:
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

    return {"train": rel(w_dev, w_cpu), "inference": rel(out_dev, out_cpu), "seconds": elapsed}


@check("workload", "pytorch", "Training step and inference vs CPU", gpu=True)
def pytorch(ctx: CheckContext) -> list[Result]:
    torch, _ = ctx.torch

    def run(gpu: GpuRecord, index: int) -> Result:
        diff = compare_with_cpu(torch, f"cuda:{index}")
        worst = max(diff["train"], diff["inference"])
        ok = worst <= TOLERANCE
        return Result.judged(
            ok,
            Status.FAIL,
            f"{worst:.1e}",
            "max rel. diff",
            **on_gpu(gpu),
            threshold=f"<= {TOLERANCE:.0e} against the CPU",
            advice="the GPU computes wrong results: rerun; if it persists, "
            "check ECC errors and take the GPU out of service",
            data={k: round(v, 9) for k, v in diff.items()},
        )

    return per_cuda_gpu(ctx, run)
