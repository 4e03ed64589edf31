"""GPU telemetry read from NVML: one `GpuSample` per GPU per poll. A counter the GPU does
not support is None (never 0: "no errors" and "cannot tell" differ); a GPU NVML can no
longer reach is a sample with `present` false, which the repair rules act on."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from gpuprovider.telemetry.standin import nvml_library

# NVML's clock event (throttle) reason bits, by the names the metrics use.
CLOCK_EVENT_REASONS = {
    "gpu_idle": 0x1,
    "applications_clocks_setting": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal_slowdown": 0x20,
    "hw_thermal_slowdown": 0x40,
    "hw_power_brake_slowdown": 0x80,
}


@dataclass
class GpuSample:
    uuid: str
    index: int
    pci_bus_id: str = ""
    present: bool = True
    error: str = ""  # why NVML could not read it
    utilization_ratio: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    # "corrected_volatile", "uncorrected_volatile", "corrected_aggregate", ...
    ecc: dict[str, int] = field(default_factory=dict)
    retired_pages: dict[str, int] = field(default_factory=dict)  # single_bit, double_bit
    retired_pages_pending: bool | None = None
    remapped_rows: dict[str, int] = field(default_factory=dict)  # correctable, uncorrectable
    row_remap_pending: bool | None = None
    row_remap_failure: bool | None = None
    clock_event_reasons: int | None = None
    pcie_replays: int | None = None
    nvlink_errors: dict[str, int] = field(default_factory=dict)  # summed over links

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GpuSample:
        return cls(**raw)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _Reader:
    def __init__(self, nvml: Any, handle: Any):
        self.nvml, self.handle = nvml, handle

    def __call__(self, name: str, *args: Any) -> Any:
        """The call's answer, or None when the GPU does not support it. A lost GPU
        raises (the whole sample is then `present` false)."""
        try:
            return getattr(self.nvml, name)(self.handle, *args)
        except self.nvml.NVMLError as exc:
            if _lost(self.nvml, exc):
                raise
            return None


def _lost(nvml: Any, exc: Exception) -> bool:
    return getattr(exc, "value", None) in (
        nvml.NVML_ERROR_GPU_IS_LOST,
        getattr(nvml, "NVML_ERROR_GPU_NOT_FOUND", -1),
    )


def _sample(nvml: Any, handle: Any, index: int) -> GpuSample:
    read = _Reader(nvml, handle)
    sample = GpuSample(uuid=_text(nvml.nvmlDeviceGetUUID(handle)), index=index)
    if pci := read("nvmlDeviceGetPciInfo"):
        sample.pci_bus_id = _text(pci.busId)
    if util := read("nvmlDeviceGetUtilizationRates"):
        sample.utilization_ratio = util.gpu / 100.0
    if memory := read("nvmlDeviceGetMemoryInfo"):
        sample.memory_used_bytes, sample.memory_total_bytes = memory.used, memory.total
    sample.temperature_c = read("nvmlDeviceGetTemperature", nvml.NVML_TEMPERATURE_GPU)
    if (power_mw := read("nvmlDeviceGetPowerUsage")) is not None:
        sample.power_w = power_mw / 1000.0
    for kind, kind_id in (
        ("corrected", nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED),
        ("uncorrected", nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
    ):
        for scope, scope_id in (
            ("volatile", nvml.NVML_VOLATILE_ECC),
            ("aggregate", nvml.NVML_AGGREGATE_ECC),
        ):
            count = read("nvmlDeviceGetTotalEccErrors", kind_id, scope_id)
            if count is not None:
                sample.ecc[f"{kind}_{scope}"] = int(count)
    for cause, cause_id in (
        ("single_bit", nvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS),
        ("double_bit", nvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR),
    ):
        pages = read("nvmlDeviceGetRetiredPages", cause_id)
        if pages is not None:
            sample.retired_pages[cause] = len(pages)
    if (pending := read("nvmlDeviceGetRetiredPagesPendingStatus")) is not None:
        sample.retired_pages_pending = bool(pending)
    if (rows := read("nvmlDeviceGetRemappedRows")) is not None:
        correctable, uncorrectable, pending_remap, failed = rows
        sample.remapped_rows = {"correctable": correctable, "uncorrectable": uncorrectable}
        sample.row_remap_pending, sample.row_remap_failure = bool(pending_remap), bool(failed)
    sample.clock_event_reasons = read("nvmlDeviceGetCurrentClocksEventReasons")
    sample.pcie_replays = read("nvmlDeviceGetPcieReplayCounter")
    for kind, kind_id in (
        ("crc_flit", nvml.NVML_NVLINK_ERROR_DL_CRC_FLIT),
        ("crc_data", nvml.NVML_NVLINK_ERROR_DL_CRC_DATA),
        ("replay", nvml.NVML_NVLINK_ERROR_DL_REPLAY),
        ("recovery", nvml.NVML_NVLINK_ERROR_DL_RECOVERY),
    ):
        total = None
        for link in range(nvml.NVML_NVLINK_MAX_LINKS):
            count = read("nvmlDeviceGetNvLinkErrorCounter", link, kind_id)
            if count is None:
                break  # links are numbered from 0; the first missing one ends them
            total = (total or 0) + int(count)
        if total is not None:
            sample.nvlink_errors[kind] = total
    return sample


@dataclass
class GpuPoll:
    at: float
    samples: list[GpuSample]
    error: str = ""  # why NVML gave nothing (no driver: no samples, not a fault)


def poll_gpus(known: dict[str, int] | None = None) -> GpuPoll:
    """One sample of every GPU NVML reports. `known` maps each GPU seen before (UUID) to
    its index, so that a GPU NVML no longer reports, or can no longer read, is still
    reported: lost."""
    nvml = nvml_library()
    at = time.time()
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return GpuPoll(at, [], f"NVML unavailable: {exc}")
    samples: list[GpuSample] = []
    unreadable: list[str] = []
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                samples.append(_sample(nvml, nvml.nvmlDeviceGetHandleByIndex(index), index))
            except nvml.NVMLError as exc:
                unreadable.append(f"GPU {index}: {exc}")
        why = "; ".join(unreadable) or "not reported by NVML"
        seen = {s.uuid for s in samples}
        for uuid, index in (known or {}).items():
            if uuid not in seen:
                samples.append(GpuSample(uuid=uuid, index=index, present=False, error=why))
        return GpuPoll(at, samples, "; ".join(unreadable))
    except nvml.NVMLError as exc:
        return GpuPoll(at, samples, f"NVML failed: {exc}")
    finally:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()
