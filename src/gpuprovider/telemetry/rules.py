"""Repair rules: a signal, a condition over a window, and the actions it causes.

A rule holds on a subject (a GPU, or a node for `node_unreachable`) when:
- `xid`: at least `threshold` of the listed XIDs were logged for the GPU within `window`;
- a counter signal (`ecc_uncorrected`, `ecc_corrected`, `retired_pages`, `pcie_replays`,
  `nvlink_errors`): the counter rose by at least `threshold` within `window` (a counter
  that goes down was reset by the driver; its rise counts from there);
- a level signal (`temperature`, `gpu_lost`, `row_remap_failure`, `row_remap_pending`,
  `node_unreachable`): the value stayed at or above `threshold` for `window`.

The engine is pure: samples in, findings out. A finding is `new` when the rule starts
to hold on its subject; while it keeps holding it is reported again (not new), which is
what alerts resend on. Acting on findings is `service/repair.py`'s work."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from gpuprovider.config import RepairConfig
from gpuprovider.domain.durations import parse_duration
from gpuprovider.domain.repair import BENIGN_XIDS, DISRUPTIVE, RepairAction, RepairRule, Signal
from gpuprovider.telemetry.gpus import GpuSample
from gpuprovider.telemetry.kernel_log import Xid

__all__ = [
    "BENIGN_XIDS",
    "DEFAULT_RULES",
    "DISRUPTIVE",
    "RepairAction",
    "RepairRule",
    "Signal",
    "merge_rules",
    "parse_duration",
    "rules_in_force",
]


def _sum(values: dict[str, int], *keys: str) -> float | None:
    found = [values[k] for k in keys if k in values]
    return float(sum(found)) if found else None


def _flag(value: bool | None) -> float | None:
    return None if value is None else float(value)


COUNTERS: dict[str, Any] = {
    # volatile counts reset with the driver; aggregate where volatile is not kept
    "ecc_uncorrected": lambda s: (
        _sum(s.ecc, "uncorrected_volatile")
        if "uncorrected_volatile" in s.ecc
        else _sum(s.ecc, "uncorrected_aggregate")
    ),
    "ecc_corrected": lambda s: (
        _sum(s.ecc, "corrected_volatile")
        if "corrected_volatile" in s.ecc
        else _sum(s.ecc, "corrected_aggregate")
    ),
    "retired_pages": lambda s: _sum(s.retired_pages, "double_bit", "single_bit"),
    "pcie_replays": lambda s: None if s.pcie_replays is None else float(s.pcie_replays),
    "nvlink_errors": lambda s: _sum(s.nvlink_errors, "crc_flit", "crc_data", "replay", "recovery"),
}
LEVELS: dict[str, Any] = {
    "temperature": lambda s: s.temperature_c,
    "gpu_lost": lambda s: 0.0 if s.present else 1.0,
    "row_remap_failure": lambda s: _flag(s.row_remap_failure),
    "row_remap_pending": lambda s: _flag(s.row_remap_pending),
}


def _rule(name: str, signal: str, actions: list[str], **more: Any) -> RepairRule:
    return RepairRule.model_validate({"name": name, "signal": signal, "actions": actions, **more})


# Shipped rules: NVIDIA's XID catalogue (what each error needs) and DLWS' ECC rule.
# deploy/prometheus/rules.yml says the same for a Prometheus of one's own.
DEFAULT_RULES = [
    _rule(
        "xid-reset-gpu",
        "xid",
        ["cordon_gpu", "reschedule", "reset_gpu", "alert"],
        # double-bit ECC, NVLink, uncontained ECC, GSP timeout and error, unrecovered ECC
        xids=[48, 74, 95, 119, 120, 140],
    ),
    _rule("xid-row-remap-failure", "xid", ["cordon_gpu", "reschedule", "alert"], xids=[64]),
    _rule("xid-fallen-off-bus", "xid", ["cordon_node", "reschedule", "alert"], xids=[79]),
    _rule("xid-high-single-bit-rate", "xid", ["warn", "alert"], xids=[92]),
    _rule(
        "ecc-uncorrected", "ecc_uncorrected", ["cordon_gpu", "reschedule", "alert"], window="10m"
    ),
    _rule("row-remap-failure", "row_remap_failure", ["cordon_gpu", "alert"]),
    _rule("row-remap-pending", "row_remap_pending", ["warn", "reset_gpu"]),
    _rule("gpu-lost", "gpu_lost", ["cordon_gpu", "reschedule", "alert"]),
    _rule("gpu-hot", "temperature", ["warn", "alert"], threshold=90, window="5m"),
    _rule("node-unreachable", "node_unreachable", ["alert"], window="5m"),
    # a node gone this long is lost: removed (its tasks were fenced and moved long
    # before), out of every count of capacity; it returns as itself if it registers again
    _rule("node-lost", "node_unreachable", ["remove_node", "alert"], window="15m"),
]


def rules_in_force(config: RepairConfig) -> list[RepairRule]:
    """The shipped rules with [repair] rules on top."""
    return merge_rules(DEFAULT_RULES, config.rules)


def merge_rules(defaults: list[RepairRule], configured: list[RepairRule]) -> list[RepairRule]:
    """The shipped rules with the configured ones on top: a configured rule replaces the
    shipped rule of its name (`enabled = false` turns it off) or adds a new one."""
    by_name = {r.name: r for r in defaults}
    for rule in configured:
        by_name[rule.name] = rule
    return [r for r in by_name.values() if r.enabled]


@dataclass
class Finding:
    rule: RepairRule
    node_id: str
    gpu_uuid: str  # empty: the rule is about the node
    evidence: dict[str, Any]
    new: bool

    @property
    def key(self) -> str:
        return f"{self.rule.name}/{self.node_id}/{self.gpu_uuid}"


@dataclass
class _Series:
    points: deque[tuple[float, float]] = field(default_factory=deque)
    since: float | None = None  # level signals: when the value reached the threshold


class RuleEngine:
    """Keeps what each rule needs per subject: counter values over the longest window,
    XID times, how long a level has held. Bounded by rules x subjects x points in a
    window (one point per poll)."""

    def __init__(self, rules: list[RepairRule]):
        self.rules = rules
        self._series: dict[tuple[str, str], _Series] = {}  # (signal or rule, subject)
        self._holding: set[str] = set()  # finding keys currently holding

    def _report(
        self, rule: RepairRule, node_id: str, gpu: str, holds: bool, evidence: dict
    ) -> Finding | None:
        key = f"{rule.name}/{node_id}/{gpu}"
        if not holds:
            self._holding.discard(key)
            return None
        new = key not in self._holding
        self._holding.add(key)
        return Finding(rule, node_id, gpu, evidence, new)

    def _level(self, series_key: tuple[str, str], at: float, value: float | None, rule: RepairRule):
        series = self._series.setdefault(series_key, _Series())
        if value is None or value < rule.threshold:
            series.since = None
            return False, value
        if series.since is None:
            series.since = at
        return at - series.since >= rule.window_s, value

    def observe_gpus(self, node_id: str, at: float, samples: list[GpuSample]) -> list[Finding]:
        findings = []
        for sample in samples:
            for rule in self.rules:
                if rule.signal in COUNTERS:
                    holds, evidence = self._counter(rule, at, sample)
                elif rule.signal in LEVELS:
                    value = LEVELS[rule.signal](sample)
                    holds, value = self._level((rule.name, sample.uuid), at, value, rule)
                    evidence = {rule.signal: value, "threshold": rule.threshold}
                    if rule.signal == "gpu_lost" and sample.error:
                        evidence["error"] = sample.error
                else:
                    continue
                if found := self._report(rule, node_id, sample.uuid, holds, evidence):
                    findings.append(found)
        return findings

    def _counter(self, rule: RepairRule, at: float, sample: GpuSample) -> tuple[bool, dict]:
        value = COUNTERS[rule.signal](sample)
        series = self._series.setdefault((rule.name, sample.uuid), _Series())
        if value is None:
            return False, {}
        series.points.append((at, value))
        while series.points and series.points[0][0] < at - rule.window_s:
            series.points.popleft()
        rise, before = 0.0, None
        for _, point in series.points:
            if before is not None and point > before:
                rise += point - before
            before = point
        holds = rise >= rule.threshold and rise > 0
        return holds, {
            rule.signal: value,
            "rise": rise,
            "window_s": rule.window_s,
            "threshold": rule.threshold,
        }

    def observe_xids(self, node_id: str, at: float, xids: list[tuple[Xid, str]]) -> list[Finding]:
        """XIDs just logged on the node, each with the GPU it names (empty: unknown
        PCI address; reported on the node)."""
        findings = []
        for rule in self.rules:
            if rule.signal != "xid":
                continue
            for xid, gpu in xids:
                if xid.code not in rule.xids:
                    continue
                series = self._series.setdefault((rule.name, gpu or node_id), _Series())
                series.points.append((at, float(xid.code)))
                while series.points and series.points[0][0] < at - rule.window_s:
                    series.points.popleft()
                if len(series.points) < rule.threshold:
                    continue
                key = f"{rule.name}/{node_id}/{gpu}"
                findings.append(
                    Finding(
                        rule,
                        node_id,
                        gpu,
                        {"xid": xid.code, "pci": xid.pci_bus_id, "text": xid.text},
                        # each logged error is news: the GPU failed again
                        new=True,
                    )
                )
                self._holding.add(key)
        return findings

    def observe_nodes(self, at: float, unreachable_since: dict[str, float]) -> list[Finding]:
        """Nodes that are unreachable, with since when; the others answer."""
        findings = []
        for rule in self.rules:
            if rule.signal != "node_unreachable":
                continue
            for key in [k for k in self._holding if k.startswith(rule.name + "/")]:
                if key.split("/")[1] not in unreachable_since:
                    self._holding.discard(key)
            for node_id, since in unreachable_since.items():
                holds = at - since >= rule.window_s
                evidence = {"unreachable_s": round(at - since, 1), "window_s": rule.window_s}
                if found := self._report(rule, node_id, "", holds, evidence):
                    findings.append(found)
        return findings


class CircuitBreaker:
    """At most max(1, `max_pct` % of the fleet's GPUs) taken out of service by rules
    within `window_s`; past that, rules stop cordoning until the window slides on."""

    def __init__(self, max_pct: float, window_s: float):
        self.max_pct, self.window_s = max_pct, window_s
        self._taken: deque[tuple[float, int]] = deque()

    def limit(self, fleet_gpus: int) -> int:
        return max(1, int(fleet_gpus * self.max_pct / 100))

    def used(self, now: float) -> int:
        while self._taken and self._taken[0][0] < now - self.window_s:
            self._taken.popleft()
        return sum(n for _, n in self._taken)

    def allow(self, now: float, fleet_gpus: int, gpus: int) -> bool:
        """Whether `gpus` more may go now; records them when they may."""
        if self.used(now) + gpus > self.limit(fleet_gpus):
            return False
        self._taken.append((now, gpus))
        return True

    def is_open(self, now: float, fleet_gpus: int) -> bool:
        return self.used(now) >= self.limit(fleet_gpus)
