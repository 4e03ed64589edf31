"""How long an honest walk takes on a GPU model: the verifier's timing window.

The walk is memory-bound by design (each step gathers m * w matrices and multiplies
one state row by each), so each model's figure is seeded from the catalogue's memory
bandwidth and is to be replaced by measurements on real GPUs (`calibration.toml`,
filled from `bench/gpu.sh`). The verifier enforces the window only for measured
entries, or when given an expected time: a seeded guess that is wrong would reject
honest providers, and an untimed walk shows nothing about memory, so a real GPU with
neither cannot pass.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from gpuprovider.domain import catalogue
from gpuprovider.proof.protocol import Params

# Seed model: bytes of device traffic per byte of matrix read by the PyTorch walk
# (gather read + write, float32 conversion read + write x4, batched GEMV read x4),
# and fixed costs per step.
WALK_TRAFFIC = 11.0
STEP_OVERHEAD_S = 100e-6  # kernel launches, the state's copies to and from the host
ROOT_S_PER_ROW = 1.5e-6  # SHA-256 of one state row on the host (the root of each step)
EFFICIENCY = 0.8  # of the catalogue bandwidth


@dataclass(frozen=True)
class Expectation:
    seconds: float
    measured: bool
    source: str


@cache
def measured() -> dict[str, dict]:
    text = resources.files(__package__).joinpath("calibration.toml").read_text()
    return {entry["model"]: entry for entry in tomllib.loads(text).get("gpu", [])}


def expected(model_id: str, params: Params) -> Expectation | None:
    """The expected walk time for `params` on `model_id`, or None for unknown models."""
    model = catalogue.models().get(model_id)
    if model is None:
        return None
    entry = measured().get(model_id)
    bandwidth = (entry or {}).get("effective_gbs", model.bandwidth_gbs * EFFICIENCY) * 1e9
    per_step = (
        params.reads_per_step * params.matrix_bytes * WALK_TRAFFIC / bandwidth
        + STEP_OVERHEAD_S
        + params.m * ROOT_S_PER_ROW
    )
    seconds = (entry or {}).get("scale", 1.0) * params.steps * per_step
    if entry:
        return Expectation(seconds, True, entry["source"])
    return Expectation(seconds, False, f"seeded from the catalogue ({model.bandwidth_gbs} GB/s)")
