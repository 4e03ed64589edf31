"""How long an honest walk takes on a GPU model: the verifier's timing window.

The walk is memory-bound by design: the fused kernel reads each matrix byte once per use
(one byte moved per byte proven), plus a fixed cost per step (the state's Merkle root on
the host, launches). A model's expected time is either

- `measured`: from a run of the at-the-limit prover on that model (`bench/gpu.sh` writes
  the entry for `calibration.toml`): the bandwidth its walk reached and its step cost; or
- `estimated`: from the catalogue's published bandwidth at EFFICIENCY, which a verifier
  uses only when it opts in (`--allow-estimated`, the hub's
  `allow_estimated_calibration`): a wrong estimate rejects honest providers or widens the
  room a slower device has, so nobody relies on one by accident.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from importlib import resources

from gpuprovider.domain import catalogue
from gpuprovider.proof.protocol import Params

WALK_TRAFFIC = 1.0  # bytes the fused walk moves per matrix byte it proves
EFFICIENCY = 0.85  # of the published bandwidth a streaming read reaches (HBM: 0.85-0.93)
STEP_OVERHEAD_S = 150e-6  # launches, the state to the host and the indices back
ROOT_S_PER_ROW = 1.2e-6  # SHA-256 of one 1 KiB state row on the host (hashlib)
# The window (0.85x-1.2x) leaves 20 % above the expected time; a measurement whose repeats
# spread wider than half that would reject honest walks, so it is not used.
MAX_SPREAD_PCT = 10.0


class Calibration(StrEnum):
    MEASURED = "measured"
    ESTIMATED = "estimated"


@dataclass(frozen=True)
class Expectation:
    seconds: float
    kind: Calibration
    source: str

    @property
    def measured(self) -> bool:
        return self.kind is Calibration.MEASURED


@cache
def measured() -> dict[str, dict]:
    text = resources.files(__package__).joinpath("calibration.toml").read_text()
    return usable(tomllib.loads(text).get("gpu", []))


def usable(entries: list[dict]) -> dict[str, dict]:
    """The entries a verifier may time against, by model: complete, and measured with a
    spread the window covers."""
    keys = {"model", "effective_gbs", "step_s", "spread_pct", "source"}
    return {
        entry["model"]: entry
        for entry in entries
        if keys <= set(entry) and entry["spread_pct"] <= MAX_SPREAD_PCT
    }


def walk_seconds(params: Params, bandwidth_bps: float, step_s: float) -> float:
    """A walk's time at `bandwidth_bps` of matrix reads plus `step_s` a step."""
    reads = params.steps * params.reads_per_step * params.matrix_bytes * WALK_TRAFFIC
    return reads / bandwidth_bps + params.steps * step_s


def expected(model_id: str, params: Params) -> Expectation | None:
    """The expected walk time for `params` on `model_id`, or None for unknown models."""
    model = catalogue.models().get(model_id)
    if model is None:
        return None
    entry = measured().get(model_id)
    if entry:
        seconds = walk_seconds(params, entry["effective_gbs"] * 1e9, entry["step_s"])
        return Expectation(seconds, Calibration.MEASURED, entry["source"])
    step_s = STEP_OVERHEAD_S + params.m * ROOT_S_PER_ROW
    seconds = walk_seconds(params, model.bandwidth_gbs * 1e9 * EFFICIENCY, step_s)
    source = f"{EFFICIENCY:.0%} of the published {model.bandwidth_gbs:g} GB/s"
    return Expectation(seconds, Calibration.ESTIMATED, source)


def kind_of(model_id: str) -> Calibration | None:
    """Whether `model_id`'s walk time is measured or estimated (None: not in the catalogue)."""
    if model_id not in catalogue.models():
        return None
    return Calibration.MEASURED if model_id in measured() else Calibration.ESTIMATED
