"""A short history per GPU for the API and dashboard: utilisation and memory used, one
point per minute for 24 hours. Bounded: 1,440 points per GPU, and a GPU not sampled for
a day is forgotten."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from gpuprovider.telemetry.gpus import GpuSample

POINTS = 24 * 60
STEP_S = 60


@dataclass
class _Minute:
    minute: int
    utilization_sum: float = 0.0
    utilization_n: int = 0
    memory_sum: float = 0.0
    memory_n: int = 0

    def point(self) -> dict[str, float | None]:
        return {
            "at": float(self.minute * STEP_S),
            "utilization_ratio": (
                self.utilization_sum / self.utilization_n if self.utilization_n else None
            ),
            "memory_used_bytes": self.memory_sum / self.memory_n if self.memory_n else None,
        }


class History:
    def __init__(self, points: int = POINTS):
        self.points = points
        self._by_gpu: dict[str, deque[_Minute]] = {}
        self._lock = threading.Lock()

    def add(self, at: float, sample: GpuSample) -> None:
        minute = int(at // STEP_S)
        with self._lock:
            series = self._by_gpu.setdefault(sample.uuid, deque(maxlen=self.points))
            if not series or series[-1].minute != minute:
                series.append(_Minute(minute))
            last = series[-1]
            if sample.utilization_ratio is not None:
                last.utilization_sum += sample.utilization_ratio
                last.utilization_n += 1
            if sample.memory_used_bytes is not None:
                last.memory_sum += sample.memory_used_bytes
                last.memory_n += 1
            horizon = minute - self.points
            for uuid in [u for u, s in self._by_gpu.items() if s and s[-1].minute < horizon]:
                del self._by_gpu[uuid]

    def of(self, uuid: str) -> list[dict[str, float | None]]:
        with self._lock:
            return [m.point() for m in self._by_gpu.get(uuid, ())]
