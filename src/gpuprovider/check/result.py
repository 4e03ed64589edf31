"""What one check found: a status, the measured value, the threshold and what to do."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass
class Result:
    status: Status
    value: float | str | None = None
    unit: str = ""
    threshold: str = ""
    advice: str = ""  # one line: what the operator should do (or why it was skipped)
    subject: str = ""  # what was measured when not the whole node: "GPU 0", "GPU 0<->1"
    gpu_uuid: str = ""  # set on results about one GPU: a FAIL here keeps work off that GPU
    data: dict[str, Any] = field(default_factory=dict)  # extra figures for charts
    group: str = ""  # filled in by the runner
    name: str = ""

    @classmethod
    def judged(
        cls,
        ok: bool,
        otherwise: Status,
        value: float | str | None = None,
        unit: str = "",
        *,
        advice: str,
        **fields: Any,
    ) -> Result:
        """PASS when `ok`; else `otherwise` (WARN or FAIL) with the `advice`."""
        return cls(
            Status.PASS if ok else otherwise, value, unit, advice="" if ok else advice, **fields
        )

    @property
    def key(self) -> str:
        return f"{self.group}/{self.name}" + (f"/{self.subject}" if self.subject else "")

    @property
    def shown_value(self) -> str:
        if self.value is None:
            return ""
        if isinstance(self.value, float):
            text = f"{self.value:,.1f}" if abs(self.value) >= 10 else f"{self.value:.3g}"
        else:
            text = str(self.value)
        return f"{text} {self.unit}".strip()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"status": str(self.status)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Result:
        return cls(**(raw | {"status": Status(raw["status"])}))


def graded(
    value: float,
    *,
    pass_at: float,
    warn_at: float | None = None,
    higher_is_better: bool = True,
) -> Status:
    """PASS at or beyond `pass_at`, WARN at or beyond `warn_at`, FAIL otherwise."""

    def reaches(limit: float) -> bool:
        return value >= limit if higher_is_better else value <= limit

    if reaches(pass_at):
        return Status.PASS
    if warn_at is not None and reaches(warn_at):
        return Status.WARN
    return Status.FAIL


def summary(results: list[Result]) -> dict[str, int]:
    counts = {str(s): 0 for s in Status}
    for result in results:
        counts[str(result.status)] += 1
    return counts


def exit_code(results: list[Result]) -> int:
    return 1 if any(r.status is Status.FAIL for r in results) else 0
