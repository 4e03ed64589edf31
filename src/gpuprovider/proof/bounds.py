"""How many mixing rounds a GPU model's challenge needs, on paper, against the fastest
generator anyone can write for that model (docs/proof-of-gpu.md, "The cost of making a
word"). The CPU's figure is measured instead (`bench/proof.py`).

rho = (time to make a matrix again) / (time to read it at the memory's bandwidth limit).
Making one 32-bit word costs `rounds` rounds of the mixer, each 9 integer instructions
(an add, three shift-xor pairs, two multiplies). We count only 7, as if two could fuse,
and the GPU's instruction issue rate is bounded by its FP32 peak in FLOPS: every NVIDIA
SM since Volta issues at most 4 warp instructions (128 lanes) per clock and has at least
64 FP32 lanes, each counted as 2 FLOPS per clock, so FP32 FLOPS >= lane-instructions per
second (equal on V100, T4 and A100; twice the issue rate on Ampere GA10x, Ada, Hopper).
Tensor cores cannot run the mixer (32-bit multiplies, shifts and xors), so:

    rho >= rounds * 7 * bandwidth / (4 bytes * fp32_flops)

which overstates every cheater's speed (no real kernel issues only these instructions).
"""

from __future__ import annotations

import math

from gpuprovider.domain.catalogue import GpuModel

OPS_PER_ROUND = 9  # what one round of mix32(x + key) is
OPS_COUNTED = 7  # a margin for instruction fusions we do not know of
WORD_BYTES = 4
RHO_FLOOR = 8.0  # every model: making a missing word costs >= 8x reading it
# Wanted where the rounds allow: a cheater keeping 90 % that makes the rest while it reads
# (fully overlapped) still takes 0.1 * rho >= 2.4 (2x the window's upper edge) over an
# honest walk at 85 % of the bandwidth limit: rho >= 28.
RHO_GOAL = 32.0
ROUNDS_MIN, ROUNDS_MAX = 256, 1024  # the verifier's CPU grows linearly with the rounds
ROUNDS_STEP = 64


def issue_ops_per_s(model: GpuModel) -> float:
    """An upper bound on the model's integer instructions per second (lane-instructions)."""
    return model.peak["fp32"] * 1e12


def rho(model: GpuModel, rounds: int) -> float:
    """Lower bound on (make a matrix) / (read it) for the fastest generator on `model`."""
    bandwidth = model.bandwidth_gbs * 1e9
    return rounds * OPS_COUNTED * bandwidth / (WORD_BYTES * issue_ops_per_s(model))


def rounds_for(model: GpuModel) -> int:
    """The rounds a challenge for `model` uses: enough for RHO_GOAL, within the bounds the
    verifier's CPU allows (those models reach RHO_FLOOR, not the goal: docs say which)."""
    bandwidth = model.bandwidth_gbs * 1e9
    need = RHO_GOAL * WORD_BYTES * issue_ops_per_s(model) / (OPS_COUNTED * bandwidth)
    rounded = ROUNDS_STEP * math.ceil(need / ROUNDS_STEP)
    return max(ROUNDS_MIN, min(ROUNDS_MAX, rounded))


def overlapped_ratio(keep: float, rho_value: float, efficiency: float = 0.85) -> float:
    """A cheater keeping `keep` that makes the rest while it reads (perfect overlap, the
    best a device with idle compute can do), over an honest walk running at `efficiency`
    of the bandwidth limit: max(keep, (1 - keep) * rho) * efficiency... at least."""
    return max(keep, (1 - keep) * rho_value) * efficiency


def serial_ratio(keep: float, rho_value: float) -> float:
    """The same cheater when making and reading cannot overlap (one CPU core, measured)."""
    return 1 + (1 - keep) * rho_value
