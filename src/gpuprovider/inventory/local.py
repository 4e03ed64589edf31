"""Hardware of this machine: psutil for CPU, memory, disk; NVML for NVIDIA GPUs;
GPUs declared in config for machines without them, marked simulated."""

from __future__ import annotations

import contextlib
import logging
import platform
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from gpuprovider.config import SimulatedGpu
from gpuprovider.domain import catalogue
from gpuprovider.domain.nodes import NodeStatus
from gpuprovider.domain.records import GpuRecord, NodeRecord
from gpuprovider.telemetry.standin import nvml_library

log = logging.getLogger(__name__)


@dataclass
class NvmlReport:
    gpus: list[GpuRecord] = field(default_factory=list)
    driver_version: str = ""
    cuda_version: str = ""
    unavailable_reason: str = ""  # why NVML gave nothing (no driver, no library)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def read_nvml(node_id: str) -> NvmlReport:
    """Every NVIDIA GPU the driver reports. No driver or library: an empty report saying
    why. A device NVML cannot read is left out and named in the report, so one bad GPU
    never hides the others nor stops the daemon."""
    pynvml = nvml_library()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return NvmlReport(unavailable_reason=f"NVML unavailable: {exc}")
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda_raw = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        report = NvmlReport(
            driver_version=driver, cuda_version=f"{cuda_raw // 1000}.{cuda_raw % 1000 // 10}"
        )
        unreadable = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            try:
                report.gpus.append(_read_device(pynvml, node_id, index, report))
            except pynvml.NVMLError as exc:
                unreadable.append(f"GPU {index}: {exc}")
        if unreadable:
            report.unavailable_reason = "NVML could not read " + "; ".join(unreadable)
        return report
    except pynvml.NVMLError as exc:
        return NvmlReport(unavailable_reason=f"NVML failed: {exc}")
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _read_device(pynvml: Any, node_id: str, index: int, report: NvmlReport) -> GpuRecord:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    name = _text(pynvml.nvmlDeviceGetName(handle))
    memory_mib = pynvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20
    try:  # pciDeviceId packs the device id above the vendor id (0x10de)
        pci_id: int | None = pynvml.nvmlDeviceGetPciInfo(handle).pciDeviceId >> 16
    except (pynvml.NVMLError, AttributeError):  # no PCI info: the name decides
        pci_id = None
    model, memory_gb = catalogue.from_device_name(name, memory_mib, pci_id)
    return GpuRecord(
        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
        node_id=node_id,
        idx=index,
        model=model,
        device_name=name,
        memory_mib=memory_mib,
        memory_gb=memory_gb,
        simulated=False,
        driver_version=report.driver_version,
        cuda_version=report.cuda_version,
    )


def torch_index(torch, uuid: str) -> int | None:
    """PyTorch's device index for an NVML GPU, matched by UUID: the orders can differ."""
    if not torch.cuda.is_available():
        return None
    for index in range(torch.cuda.device_count()):
        found = str(getattr(torch.cuda.get_device_properties(index), "uuid", ""))
        if found and uuid.removeprefix("GPU-") == found.removeprefix("GPU-"):
            return index
    return None


def simulated_gpus(node_id: str, declared: list[SimulatedGpu], first_index: int) -> list[GpuRecord]:
    """GPUs declared in config, with UUIDs stable across restarts of the same node."""
    gpus = []
    index = first_index
    for entry in declared:
        model = catalogue.models()[entry.model]
        for _ in range(entry.count):
            gpus.append(
                GpuRecord(
                    uuid=f"GPU-sim-{node_id}-{index}",
                    node_id=node_id,
                    idx=index,
                    model=model.id,
                    device_name=f"simulated {model.id}",
                    memory_mib=model.memory_gb * 1024,
                    memory_gb=model.memory_gb,
                    simulated=True,
                )
            )
            index += 1
    return gpus


def read_local_node(
    node_id: str,
    name: str,
    public_key: str,
    data_dir: Path,
    declared: list[SimulatedGpu],
    labels: dict[str, str] | None = None,
    nvml: NvmlReport | None = None,
    use_nvml: bool = True,
) -> NodeRecord:
    """This machine as a node: its hardware, the GPUs NVML finds (unless `use_nvml` is
    off) and those declared as simulated."""
    if nvml is None:
        nvml = (
            read_nvml(node_id) if use_nvml else NvmlReport(unavailable_reason="NVML off in config")
        )
    gpus = nvml.gpus + simulated_gpus(node_id, declared, first_index=len(nvml.gpus))
    return NodeRecord(
        id=node_id,
        name=name or socket.gethostname(),
        address="127.0.0.1",
        backend="local",
        labels=dict(labels or {}),
        status=NodeStatus.READY,
        status_reason="",
        cpu_count=psutil.cpu_count() or 1,
        memory_mib=psutil.virtual_memory().total // 2**20,
        disk_mib=psutil.disk_usage(str(data_dir)).free // 2**20,
        public_key=public_key,
        facts={
            "os": platform.platform(),
            "python": platform.python_version(),
            "driver_version": nvml.driver_version,
            "cuda_version": nvml.cuda_version,
            "nvml": nvml.unavailable_reason or "ok",
        },
        last_heartbeat=time.time(),
        gpus=gpus,
    )
