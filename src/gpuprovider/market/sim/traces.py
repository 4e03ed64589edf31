"""The public traces the simulator is built from, read strictly: a file missing a
column, a field that is not a number, or a pod that ends before it starts is refused
with the file, the row (1 = the first row after the header) and the column named.

- openb pods (Alibaba, the FGD paper's trace): shapes, model constraints, creation and
  deletion times;
- Azure LLM inference 2023: request times and token counts;
- reference GPU prices: USD per GPU-hour per model, from three public sources.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

TRACES_ENV = "GPUPROVIDER_TRACES"


def default_traces() -> Path:
    """Where the traces are: $GPUPROVIDER_TRACES, else the first `shared/traces` beside
    a folder above this file (a checkout's `../shared/traces`)."""
    if os.environ.get(TRACES_ENV):
        return Path(os.environ[TRACES_ENV])
    for folder in Path(__file__).resolve().parents:
        if (folder / "shared" / "traces").is_dir():
            return folder / "shared" / "traces"
    raise TraceError(
        f"no traces folder found: set {TRACES_ENV} or pass the folder (it holds openb/, "
        "azure-llm-2023/ and gpu-prices/)"
    )


class TraceError(ValueError):
    """A trace file that cannot be used as it is; the message names where and why."""


def _rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    try:
        with open(path, newline="") as handle:
            text = handle.read()
    except OSError as exc:
        raise TraceError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = reader.fieldnames or []
    missing = [c for c in required if c not in columns]
    if missing:
        raise TraceError(
            f"{path.name}: missing column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)} (the header has: {', '.join(columns) or 'nothing'})"
        )
    yield from enumerate(reader, start=1)


def _integer(path: Path, number: int, row: dict[str, str], column: str) -> int:
    text = (row.get(column) or "").strip()
    try:
        return int(text)
    except ValueError:
        raise TraceError(
            f"{path.name} row {number}: {column} is {text!r}, not an integer"
        ) from None


# -- openb pods --------------------------------------------------------------------------

POD_COLUMNS = (
    "name",
    "cpu_milli",
    "memory_mib",
    "num_gpu",
    "gpu_milli",
    "creation_time",
    "deletion_time",
)


@dataclass(frozen=True)
class Pod:
    name: str
    cpu_milli: int
    memory_mib: int
    num_gpu: int
    gpu_milli: int  # per GPU: < 1000 is a share of one GPU
    gpu_spec: tuple[str, ...]  # openb models it may run on; () any
    created_s: int
    duration_s: int

    @property
    def gpus(self) -> float:
        """GPUs it holds: a count, or the share of one."""
        if not self.num_gpu or not self.gpu_milli:
            return 0.0
        return self.num_gpu if self.gpu_milli >= 1000 else self.gpu_milli / 1000


def load_pods(path: Path) -> list[Pod]:
    pods = []
    for number, row in _rows(path, POD_COLUMNS):
        values = {c: _integer(path, number, row, c) for c in POD_COLUMNS if c != "name"}
        for column in ("cpu_milli", "memory_mib", "num_gpu", "gpu_milli", "creation_time"):
            if values[column] < 0:
                raise TraceError(f"{path.name} row {number}: {column} is negative")
        if values["gpu_milli"] > 1000:
            raise TraceError(f"{path.name} row {number}: gpu_milli is above 1000 (one GPU)")
        duration = values["deletion_time"] - values["creation_time"]
        if duration < 0:
            raise TraceError(
                f"{path.name} row {number} ({row['name']}): negative duration: deletion_time "
                f"{values['deletion_time']} is before creation_time {values['creation_time']}"
            )
        spec = (row.get("gpu_spec") or "").strip()
        pods.append(
            Pod(
                name=row["name"],
                cpu_milli=values["cpu_milli"],
                memory_mib=values["memory_mib"],
                num_gpu=values["num_gpu"],
                gpu_milli=values["gpu_milli"],
                gpu_spec=tuple(s for s in spec.split("|") if s),
                created_s=values["creation_time"],
                duration_s=duration,
            )
        )
    if not pods:
        raise TraceError(f"{path.name}: no pods")
    return pods


# -- Azure LLM inference requests -----------------------------------------------------

REQUEST_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True)
class Requests:
    """One request stream: seconds from its first request, and tokens in and out."""

    name: str
    at_s: np.ndarray  # float64, sorted
    context_tokens: np.ndarray  # int64
    generated_tokens: np.ndarray  # int64

    @property
    def span_s(self) -> float:
        return float(self.at_s[-1]) if len(self.at_s) else 0.0


def load_requests(path: Path) -> Requests:
    times: list[float] = []
    context: list[int] = []
    generated: list[int] = []
    for number, row in _rows(path, REQUEST_COLUMNS):
        text = (row["TIMESTAMP"] or "").strip()
        try:
            times.append(datetime.fromisoformat(text).timestamp())
        except ValueError:
            raise TraceError(
                f"{path.name} row {number}: TIMESTAMP is {text!r}, not a date and time"
            ) from None
        for column, into in (("ContextTokens", context), ("GeneratedTokens", generated)):
            value = _integer(path, number, row, column)
            if value < 0:
                raise TraceError(f"{path.name} row {number}: {column} is negative")
            into.append(value)
    if not times:
        raise TraceError(f"{path.name}: no requests")
    at = np.array(times, dtype=np.float64)
    order = np.argsort(at, kind="stable")
    at = at[order] - at[order[0]]
    return Requests(
        path.stem.removeprefix("AzureLLMInferenceTrace_"),
        at,
        np.array(context, dtype=np.int64)[order],
        np.array(generated, dtype=np.int64)[order],
    )


# -- reference prices -------------------------------------------------------------------


class PriceColumn:
    CHUTES = "chutes_hourly_usd"  # Chutes' hourly rate per GPU (its miners' cost basis)
    VAST = "vast_per_gpu_usd"  # on-demand per-GPU prices on Vast.ai (ranges: midpoint)
    AKASH = "akash_list_usd"  # Akash's list prices


def load_prices(path: Path) -> dict[str, dict[str, float]]:
    """{column: {price key: USD per GPU-hour}}, empty cells left out; `0.67-0.80` is
    read as its midpoint."""
    prices: dict[str, dict[str, float]] = {}
    for number, row in _rows(path, ("model",)):
        key = (row["model"] or "").strip()
        if not key:
            raise TraceError(f"{path.name} row {number}: model is empty")
        for column, text in row.items():
            if column == "model" or not (text or "").strip():
                continue
            parts = text.strip().split("-")
            try:
                values = [float(p) for p in parts]
            except ValueError:
                raise TraceError(
                    f"{path.name} row {number} ({key}): {column} is {text!r}, not a price"
                ) from None
            value = sum(values) / len(values)
            if not (math.isfinite(value) and value > 0) or len(values) > 2:
                raise TraceError(
                    f"{path.name} row {number} ({key}): {column} is {text!r}, not a positive price"
                )
            prices.setdefault(column, {})[key] = value
    return prices
