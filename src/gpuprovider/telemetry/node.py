"""What one node reports about its GPUs: run where the GPUs are (the daemon for the
local node, each node's agent on Ray). NVML when a poll is due; the kernel log's new
XIDs every time, each mapped to its GPU by PCI address."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gpuprovider.telemetry.gpus import GpuSample, poll_gpus
from gpuprovider.telemetry.kernel_log import KernelLog, Xid, default_kernel_log, pci_key


@dataclass
class XidSeen:
    xid: Xid
    gpu_uuid: str  # empty: no GPU of this node has that PCI address


@dataclass
class NodeTelemetry:
    node_id: str
    at: float
    samples: list[GpuSample] | None = None  # None: no NVML poll this time
    xids: list[XidSeen] = field(default_factory=list)
    kernel_log_malformed: int = 0  # lines naming an XID that could not be read, so far
    errors: list[str] = field(default_factory=list)


class NodeWatcher:
    def __init__(self, node_id: str, kernel_log: str = "auto", nvml: bool = True):
        self.node_id, self.nvml = node_id, nvml
        path = default_kernel_log() if kernel_log == "auto" else kernel_log
        self.kernel_log = KernelLog(path) if path else None
        self._known: dict[str, int] = {}  # GPUs seen: UUID -> index
        self._by_pci: dict[str, str] = {}  # PCI key -> UUID

    def read(self, poll_nvml: bool) -> NodeTelemetry:
        report = NodeTelemetry(self.node_id, time.time())
        if poll_nvml and self.nvml:
            poll = poll_gpus(self._known)
            report.samples = poll.samples
            if poll.error and not poll.error.startswith("NVML unavailable"):
                report.errors.append(poll.error)
            for sample in poll.samples:
                if sample.present:
                    self._known[sample.uuid] = sample.index
                    if key := pci_key(sample.pci_bus_id):
                        self._by_pci[key] = sample.uuid
        if self.kernel_log is not None:
            for xid in self.kernel_log.read():
                report.xids.append(XidSeen(xid, self._by_pci.get(xid.pci_bus_id, "")))
            report.kernel_log_malformed = self.kernel_log.malformed
            if self.kernel_log.error:
                report.errors.append(self.kernel_log.error)
        return report
