"""Resource requests: GPU constraints (`H100:80GB:2`, `A100|H100:1`, `24GB..:1`, `0.5`),
CPU and memory, parsed into plain values the scheduler matches against."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from gpuprovider.domain import catalogue

MAX_GPUS_PER_TASK = 64
MILLI = 1000

_MAX_MIB = 1 << 40  # a petabyte and more: no machine has it
MAX_GPU_TEXT = 256
_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|kib|mb|mib|gb|gib|tb|tib)?\s*$", re.I)
_SIZE = r"\d+(?:\.\d+)?\s*(?:mb|mib|gb|gib|tb|tib)"
# `80GB`, `24GB..`, `..48GB`, `24GB..48GB`: a bound on GPU memory in a constraint.
_MEMORY_BOUND_RE = re.compile(rf"^(?:{_SIZE}|{_SIZE}\.\.(?:{_SIZE})?|\.\.{_SIZE})$", re.I)
_MIB_PER_UNIT = {
    "b": 1 / 2**20,
    "kb": 1000 / 2**20,
    "kib": 1 / 1024,
    "mb": 1000**2 / 2**20,
    "mib": 1,
    "gb": 1000**3 / 2**20,
    "gib": 1024,
    "tb": 1000**4 / 2**20,
    "tib": 1024**2,
}


def parse_memory_mib(value: str | int | float) -> int:
    """`16GB`, `512MiB` or a bare number of MiB -> MiB."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError("memory must be a size such as '16GB' or a number of MiB")
    if isinstance(value, str) and len(value) > 64:
        raise ValueError(f"memory {value[:20]!r}... is {len(value)} characters; a size is short")
    if isinstance(value, int) and abs(value) > _MAX_MIB:  # before float(): it may not fit
        raise ValueError(f"memory {str(value)[:20]}... MiB is larger than any machine")
    if isinstance(value, int | float):
        number, unit = float(value), "mib"
    else:
        match = _MEMORY_RE.match(value)
        if not match:
            raise ValueError(
                f"cannot read {value!r} as a memory size; write e.g. '16GB' or '512MiB'"
            )
        number, unit = float(match.group(1)), (match.group(2) or "mib").lower()
    if not math.isfinite(number):
        raise ValueError(f"memory {value!r} is not a finite size")
    if number < 0:
        raise ValueError("memory cannot be negative")
    mib = number * _MIB_PER_UNIT[unit]
    if mib > _MAX_MIB:
        raise ValueError(f"memory {value!r} is larger than any machine")
    return round(mib)


@dataclass(frozen=True)
class GpuRequest:
    """What a task asks of GPUs. `count` whole GPUs, or a `share_milli` of one GPU."""

    count: int = 0
    share_milli: int = 0
    models: frozenset[str] | None = None  # catalogue ids allowed; None = any
    model_text: str = ""  # as the user wrote it, for messages
    min_memory_gb: int | None = None
    max_memory_gb: int | None = None

    @property
    def wants_gpu(self) -> bool:
        return self.count > 0 or self.share_milli > 0

    @property
    def gpus_touched(self) -> int:
        return self.count if self.count else (1 if self.share_milli else 0)

    @property
    def milli_per_gpu(self) -> int:
        return MILLI if self.count else self.share_milli

    @property
    def memory_range(self) -> str:
        """`80GB..`, `..48GB`, `24GB..48GB`, or empty when memory is not constrained."""
        if self.min_memory_gb is None and self.max_memory_gb is None:
            return ""
        lo = f"{self.min_memory_gb}GB" if self.min_memory_gb is not None else ""
        hi = f"{self.max_memory_gb}GB" if self.max_memory_gb is not None else ""
        return f"{lo}..{hi}"

    def describe(self) -> str:
        """`2 H100 (80GB..)` or `0.5 of one GPU`, for reasons shown to users."""
        what = self.model_text or "GPU"
        if self.memory_range:
            what += f" ({self.memory_range})"
        if self.count:
            return f"{self.count} {what}"
        return f"{self.share_milli / MILLI:g} of one {what}"

    def to_text(self) -> str:
        """The canonical constraint text, which parses back to this request."""
        parts = [p for p in (self.model_text, self.memory_range) if p]
        parts.append(str(self.count) if self.count else f"{self.share_milli / MILLI:g}")
        return ":".join(parts)

    def matches(self, model_id: str, memory_gb: int) -> bool:
        if self.models is not None and model_id not in self.models:
            return False
        if self.min_memory_gb is not None and memory_gb < self.min_memory_gb:
            return False
        return self.max_memory_gb is None or memory_gb <= self.max_memory_gb


def _parse_memory_bound(text: str) -> tuple[int | None, int | None]:
    """`80GB` (at least), `24GB..`, `..48GB`, `24GB..48GB` -> (min, max) in GB."""

    def gb(part: str) -> int | None:
        if not part:
            return None
        mib = parse_memory_mib(part)
        return round(mib * 2**20 / 1000**3)

    if ".." in text:
        lo, hi = text.split("..", 1)
        return gb(lo), gb(hi)
    return gb(text), None


def _parse_count(text: str) -> tuple[int, int]:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"GPU count {text!r} is not a number") from None
    if value < 0:
        raise ValueError("GPU count cannot be negative")
    if not math.isfinite(value) or value > MAX_GPUS_PER_TASK:
        shown = text if len(text) <= 20 else text[:20] + "..."
        raise ValueError(f"GPU count {shown} is more than {MAX_GPUS_PER_TASK} per task")
    if 0 < value < 1:
        share = round(value * MILLI)
        if share < 1:
            raise ValueError("a GPU fraction must be at least 0.001")
        return 0, share
    if value != int(value):
        raise ValueError(
            f"GPU count {text} is neither a whole number nor a fraction of one GPU (0 < f < 1)"
        )
    return int(value), 0


def parse_gpu_request(text: str | int | float) -> GpuRequest:
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise ValueError("gpu must be a count or a constraint such as 'H100:80GB:2'")
    if isinstance(text, str) and len(text) > MAX_GPU_TEXT:
        raise ValueError(f"gpu constraint is {len(text)} characters; at most {MAX_GPU_TEXT}")
    not_finite = isinstance(text, float) and not math.isfinite(text)
    if not_finite or (isinstance(text, int) and abs(text) > 1 << 20):
        raise ValueError(f"gpu {str(text)[:20]} is not a count of GPUs")
    if isinstance(text, int | float):
        text = f"{text:g}" if isinstance(text, float) else str(text)
    text = text.strip()
    if not text:
        raise ValueError("gpu constraint is empty")
    parts = text.split(":")
    count, share = 1, 0
    if re.fullmatch(r"-?(\d+(\.\d+)?|\.\d+)", parts[-1].strip()):
        count, share = _parse_count(parts.pop().strip())
    models: frozenset[str] | None = None
    model_text = ""
    min_gb = max_gb = None
    for part in (p.strip() for p in parts):
        if _MEMORY_BOUND_RE.match(part):
            if min_gb is not None or max_gb is not None:
                raise ValueError(f"{text!r} gives GPU memory twice")
            min_gb, max_gb = _parse_memory_bound(part)
        elif part:
            if models is not None:
                raise ValueError(f"{text!r} gives GPU models twice; write them as 'A100|H100'")
            names = [n.strip() for n in part.split("|") if n.strip()]
            allowed: set[str] = set()
            for name in names:
                allowed |= catalogue.resolve(name)
            models, model_text = frozenset(allowed), "|".join(n.upper() for n in names)
        else:
            raise ValueError(f"{text!r} has an empty part between ':'")
    if min_gb is not None and max_gb is not None and min_gb > max_gb:
        raise ValueError(f"GPU memory range {min_gb}GB..{max_gb}GB is empty")
    request = GpuRequest(count, share, models, model_text, min_gb, max_gb)
    if models is not None and (min_gb is not None or max_gb is not None):
        known = catalogue.models()
        if not any(request.matches(m, known[m].memory_gb) for m in models):
            sizes = sorted({known[m].memory_gb for m in models})
            raise ValueError(
                f"no {model_text} has the GPU memory asked for in {text!r}: "
                f"{model_text} comes with {', '.join(f'{s}GB' for s in sizes)}"
            )
    return request
