"""What the checks need to know about this machine, read once per run."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import ModuleType

from gpuprovider.config import ProviderConfig
from gpuprovider.domain import catalogue
from gpuprovider.domain.records import GpuRecord
from gpuprovider.inventory.local import NvmlReport, read_nvml, torch_index


@dataclass
class CheckContext:
    config: ProviderConfig
    data_dir: Path  # where tasks and caches live: the provider's home
    node_id: str = "local"
    # Sizes of the measurements; tests shrink them, the defaults suit a real node.
    scale: float = 1.0
    nvml: NvmlReport | None = None

    def __post_init__(self) -> None:
        if self.nvml is None and not self.config.inventory.nvml:
            self.nvml = NvmlReport(unavailable_reason="NVML is off ([inventory] nvml = false)")
        elif self.nvml is None:
            self.nvml = read_nvml(self.node_id)

    @property
    def report(self) -> NvmlReport:
        """What NVML reported (read, or given, by the time the context exists)."""
        assert self.nvml is not None  # __post_init__ sets it
        return self.nvml

    @property
    def gpus(self) -> list[GpuRecord]:
        """The NVIDIA GPUs the driver reports (simulated GPUs are not measured)."""
        return self.report.gpus

    def model(self, gpu: GpuRecord) -> catalogue.GpuModel | None:
        return catalogue.models().get(gpu.model)

    @cached_property
    def torch(self) -> tuple[ModuleType | None, str]:
        """(torch, "") when PyTorch can use a CUDA GPU here, else (None or torch, why not)."""
        try:
            torch = importlib.import_module("torch")
        except ImportError:
            return None, "PyTorch is not installed (pip install 'gpuprovider[gpu]')"
        if not torch.cuda.is_available():
            return torch, "PyTorch finds no CUDA GPU"
        return torch, ""

    def cuda_index(self, gpu: GpuRecord) -> int | None:
        torch, why = self.torch
        return None if why else torch_index(torch, gpu.uuid)
