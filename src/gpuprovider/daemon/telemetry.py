"""The telemetry loop: every second, new XIDs from the local kernel log; every
`[telemetry] interval_s`, an NVML sample of every node's GPUs and the booked/idle
accounting. What it reads goes to `RepairService`, which keeps it and acts on it."""

from __future__ import annotations

import logging
import time

from gpuprovider.backends.base import Backend
from gpuprovider.daemon.loops import Loop
from gpuprovider.service.repair import RepairService

log = logging.getLogger(__name__)
KERNEL_LOG_EVERY_S = 1.0


class TelemetryLoop(Loop):
    def __init__(self, backend: Backend, repair: RepairService, interval_s: float, kernel_log: str):
        super().__init__("telemetry", KERNEL_LOG_EVERY_S)
        self.backend, self.repair = backend, repair
        self.nvml_interval_s, self.kernel_log = interval_s, kernel_log
        self._nvml_due = 0.0
        self._said: set[str] = set()

    def tick(self) -> float | None:
        now = time.time()
        due = now >= self._nvml_due
        if due:
            self._nvml_due = now + self.nvml_interval_s
        reports = self.backend.telemetry(due, self.kernel_log)
        for report in reports:
            for error in report.errors:
                if error not in self._said:  # once per distinct trouble, not every second
                    self._said.add(error)
                    log.warning("telemetry on node %s: %s", report.node_id, error)
        self.repair.observe(reports, now)
        if due:
            self.repair.account(now, max_gap_s=3 * self.nvml_interval_s)
        return None
