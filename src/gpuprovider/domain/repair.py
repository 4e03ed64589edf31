"""A repair rule as configured: a signal, a condition over a window, the actions it
causes (`telemetry/rules.py` evaluates rules; `service/repair.py` acts on them)."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gpuprovider.domain.durations import parse_duration

# NVIDIA's XID catalogue: these mean an application's own fault or a recovered event;
# no rule may cordon, drain, reschedule or reset on them.
BENIGN_XIDS = frozenset({13, 31, 43, 45, 63, 94})

Signal = Literal[
    "xid",
    "ecc_uncorrected",
    "ecc_corrected",
    "retired_pages",
    "pcie_replays",
    "nvlink_errors",
    "temperature",
    "gpu_lost",
    "row_remap_failure",
    "row_remap_pending",
    "node_unreachable",
]


class RepairAction(StrEnum):
    WARN = "warn"
    CORDON_GPU = "cordon_gpu"
    CORDON_NODE = "cordon_node"
    DRAIN = "drain"
    RESCHEDULE = "reschedule"
    RESET_GPU = "reset_gpu"
    REMOVE_NODE = "remove_node"
    ALERT = "alert"


A = RepairAction
# What takes capacity away: passes the circuit breaker first.
DISRUPTIVE = frozenset(
    {A.CORDON_GPU, A.CORDON_NODE, A.DRAIN, A.RESCHEDULE, A.RESET_GPU, A.REMOVE_NODE}
)


class RepairRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    signal: Signal
    xids: list[int] = Field(default_factory=list)
    threshold: float = Field(1.0, ge=0)
    window: str = "0s"
    actions: list[RepairAction] = Field(min_length=1)
    enabled: bool = True

    @field_validator("window", mode="before")
    @classmethod
    def _duration(cls, value: object) -> str:
        parse_duration(value)  # type: ignore[arg-type]
        return str(value)

    @property
    def window_s(self) -> float:
        return parse_duration(self.window)

    @model_validator(mode="after")
    def _consistent(self) -> RepairRule:
        if self.signal == "xid":
            if not self.xids:
                raise ValueError(f"rule {self.name}: signal xid needs the XIDs it acts on (xids)")
            benign = sorted(BENIGN_XIDS & set(self.xids))
            disruptive = sorted(DISRUPTIVE & set(self.actions))
            if benign and disruptive:
                raise ValueError(
                    f"rule {self.name}: XIDs {benign} are benign (an application's own error or "
                    f"a recovered event); a rule on them may only warn or alert, not "
                    f"{', '.join(disruptive)}"
                )
        elif self.xids:
            raise ValueError(f"rule {self.name}: xids apply to signal xid only")
        if self.signal == "node_unreachable" and {A.CORDON_GPU, A.RESET_GPU} & set(self.actions):
            raise ValueError(f"rule {self.name}: node_unreachable concerns a node, not a GPU")
        if A.REMOVE_NODE in self.actions and self.signal != "node_unreachable":
            raise ValueError(
                f"rule {self.name}: remove_node is for signal node_unreachable only (a node "
                "that answers is drained or cordoned, and removed by a person)"
            )
        return self
