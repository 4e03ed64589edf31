"""A stand-in for NVML (`pynvml`'s functions, scripted values), for tests and benches on
machines without a GPU. The script is a JSON file read again at every `nvmlInit`, so a
test changes what the "driver" reports by rewriting it:

    {"driver": "570.86", "gpus": [{"uuid": "GPU-a", "name": "NVIDIA H100 80GB HBM3",
      "pci": "00000000:3B:00.0", "memory_total": 85899345920, "memory_used": 0,
      "utilization": 0, "temperature": 35, "power_mw": 70000,
      "ecc": {"uncorrected_volatile": 0, "uncorrected_aggregate": 0,
              "corrected_volatile": 0, "corrected_aggregate": 0},
      "retired": {"single_bit": 0, "double_bit": 0, "pending": false},
      "remap": {"correctable": 0, "uncorrectable": 0, "pending": false, "failure": false},
      "clock_reasons": 0, "pcie_replays": 0,
      "nvlink": {"crc_flit": 0, "crc_data": 0, "replay": 0, "recovery": 0},
      "lost": false}]}

A GPU left out of the list has vanished; `"lost": true` makes every call on it fail as
NVML does for a GPU that fell off the bus. Absent counters are "not supported"."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pynvml

# Environment variable naming the script: set, the provider reads this stand-in instead
# of the driver (inventory and telemetry alike).
ENV = "GPUPROVIDER_STANDIN_NVML"

NVML_NVLINK_MAX_LINKS = 1  # the script gives one sum per counter
_NVLINK = {
    pynvml.NVML_NVLINK_ERROR_DL_REPLAY: "replay",
    pynvml.NVML_NVLINK_ERROR_DL_RECOVERY: "recovery",
    pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT: "crc_flit",
    pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA: "crc_data",
}
_ECC = {
    (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_VOLATILE_ECC): "corrected_volatile",
    (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_AGGREGATE_ECC): "corrected_aggregate",
    (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC): "uncorrected_volatile",
    (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_AGGREGATE_ECC): "uncorrected_aggregate",
}


class _Struct:
    def __init__(self, **fields: Any):
        self.__dict__.update(fields)


class StandinNvml:
    """The subset of pynvml the provider calls, answering from the script at `path`."""

    NVMLError = pynvml.NVMLError

    def __init__(self, path: str):
        self.path = Path(path)
        self._script: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:  # constants shared with pynvml
        if name.startswith(("NVML_", "NVMLError")):
            return globals().get(name, getattr(pynvml, name))
        raise AttributeError(name)

    def nvmlInit(self) -> None:
        try:
            self._script = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND) from exc

    def nvmlShutdown(self) -> None:
        pass

    def nvmlSystemGetDriverVersion(self) -> str:
        return self._script.get("driver", "570.86.15")

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        return int(self._script.get("cuda", 12080))

    def nvmlDeviceGetCount(self) -> int:
        return len(self._script.get("gpus", []))

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict[str, Any]:
        gpus = self._script.get("gpus", [])
        if not 0 <= index < len(gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpus[index]

    @staticmethod
    def _get(handle: dict[str, Any], *keys: str) -> Any:
        if handle.get("lost"):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        value: Any = handle
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            value = value[key]
        return value

    def nvmlDeviceGetName(self, handle: dict[str, Any]) -> str:
        return self._get(handle, "name")

    def nvmlDeviceGetUUID(self, handle: dict[str, Any]) -> str:
        return self._get(handle, "uuid")

    def nvmlDeviceGetPciInfo(self, handle: dict[str, Any]) -> _Struct:
        return _Struct(busId=self._get(handle, "pci"), pciDeviceId=handle.get("pci_device_id", 0))

    def nvmlDeviceGetMemoryInfo(self, handle: dict[str, Any]) -> _Struct:
        total = self._get(handle, "memory_total")
        used = handle.get("memory_used", 0)
        return _Struct(total=total, used=used, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, handle: dict[str, Any]) -> _Struct:
        return _Struct(gpu=self._get(handle, "utilization"), memory=0)

    def nvmlDeviceGetTemperature(self, handle: dict[str, Any], sensor: int) -> int:
        return self._get(handle, "temperature")

    def nvmlDeviceGetPowerUsage(self, handle: dict[str, Any]) -> int:
        return self._get(handle, "power_mw")

    def nvmlDeviceGetTotalEccErrors(self, handle: dict[str, Any], kind: int, counter: int) -> int:
        return self._get(handle, "ecc", _ECC[(kind, counter)])

    def nvmlDeviceGetRetiredPages(self, handle: dict[str, Any], cause: int) -> list[int]:
        double = pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
        key = "double_bit" if cause == double else "single_bit"
        return list(range(self._get(handle, "retired", key)))

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: dict[str, Any]) -> int:
        return int(bool(self._get(handle, "retired", "pending")))

    def nvmlDeviceGetRemappedRows(self, handle: dict[str, Any]) -> tuple[int, int, int, int]:
        remap = self._get(handle, "remap")
        return (
            remap.get("correctable", 0),
            remap.get("uncorrectable", 0),
            int(bool(remap.get("pending"))),
            int(bool(remap.get("failure"))),
        )

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: dict[str, Any]) -> int:
        return self._get(handle, "clock_reasons")

    def nvmlDeviceGetPcieReplayCounter(self, handle: dict[str, Any]) -> int:
        return self._get(handle, "pcie_replays")

    def nvmlDeviceGetNvLinkErrorCounter(self, handle: dict[str, Any], link: int, kind: int) -> int:
        return self._get(handle, "nvlink", _NVLINK[kind])


def nvml_library() -> Any:
    """What the provider calls for NVML: the driver's, or the stand-in when `ENV` names a
    script."""
    script = os.environ.get(ENV)
    return StandinNvml(script) if script else pynvml
