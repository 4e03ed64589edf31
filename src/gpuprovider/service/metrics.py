"""/metrics: the provider in Prometheus' text format. Names `gpuprovider_*`, base units
(seconds, bytes, ratios, watts, celsius), labels from bounded sets only (node, GPU
uuid/index, model, tenant, state, reason kinds); task ids never.

Read at scrape time from the store (nodes, GPUs, tasks, accounting, checks, proofs,
repair actions) and from the telemetry the loop keeps (`RepairService`); two histograms
(queue wait, scheduler pass) are observed by the scheduler loop as it works."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpuprovider.domain.nodes import NodeStatus
from gpuprovider.domain.process import failure_kind
from gpuprovider.domain.rentals import RentalState
from gpuprovider.domain.usability import Usability
from gpuprovider.service.repair import REPAIR_CORDON, RepairService
from gpuprovider.store.store import Store
from gpuprovider.telemetry.gpus import CLOCK_EVENT_REASONS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
GPU_LABELS = ["node", "uuid", "index", "model"]


def _cordon_kind(reason: str) -> str:
    return "repair" if reason.startswith(REPAIR_CORDON) else "operator"


class _Families:
    """Metric families by name, made on first use."""

    def __init__(self) -> None:
        self.made: dict[str, Metric] = {}

    def gauge(self, name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
        if name not in self.made:
            self.made[name] = GaugeMetricFamily(name, doc, labels=labels)
        return self.made[name]  # type: ignore[return-value]

    def counter(self, name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
        if name not in self.made:
            self.made[name] = CounterMetricFamily(name, doc, labels=labels)
        return self.made[name]  # type: ignore[return-value]


class ProviderCollector(Collector):
    def __init__(self, store: Store, usability: Usability, repair: RepairService | None):
        self.store, self.usability, self.repair = store, usability, repair

    def describe(self) -> list[Metric]:
        return []  # families depend on what exists; collected at scrape time only

    def collect(self) -> Iterator[Metric]:
        f = _Families()
        now = time.time()
        with self.store.read() as r:
            nodes = r.nodes.list()
            by_state = r.tasks.count_by_state()
            transitions = r.tasks.transitions()
            failures = r.tasks.failure_reasons()
            usage = r.repairs.usage()
            checks = r.checks.last_pass()
            repairs = r.repairs.counts()
            rentals = r.rentals.list()
        self._nodes(f, nodes, now)
        self._rentals(f, nodes, rentals)
        self._tasks(f, by_state, transitions, failures)
        for tenant, model, booked_s, idle_s in usage:
            f.counter(
                "gpuprovider_gpu_booked_seconds",
                "GPU-seconds booked by tasks (a share of a GPU counts its share)",
                ["tenant", "model"],
            ).add_metric([tenant, model], booked_s)
            f.counter(
                "gpuprovider_gpu_idle_seconds",
                "booked GPU-seconds sampled at utilisation 0 (DLWS' idle)",
                ["tenant", "model"],
            ).add_metric([tenant, model], idle_s)
        names = {n.id: n.name for n in nodes}
        for node_id, at in checks.items():
            f.gauge(
                "gpuprovider_check_last_success_timestamp_seconds",
                "when a check last passed on the node",
                ["node"],
            ).add_metric([names.get(node_id, node_id)], at)
        for rule, action, outcome, n in repairs:
            f.counter(
                "gpuprovider_repair_actions",
                "actions of repair rules, by outcome (done, dry-run, breaker-open, failed, ...)",
                ["rule", "action", "outcome"],
            ).add_metric([rule, action, outcome], n)
        if self.repair is not None:
            self._telemetry(f, nodes)
        yield from f.made.values()

    @staticmethod
    def _rentals(f: _Families, nodes: list[Any], rentals: list[Any]) -> None:
        running = {r.node_id for r in rentals if r.state == RentalState.RUNNING}
        for node in nodes:
            f.gauge(
                "gpuprovider_node_rented", "1 while a rental runs on the node", ["node"]
            ).add_metric([node.name], float(node.id in running))
        for state in RentalState:
            if state == RentalState.DELETED:
                continue
            f.gauge("gpuprovider_rentals", "rentals by state", ["state"]).add_metric(
                [state.value], float(sum(r.state == state for r in rentals))
            )

    def _nodes(self, f: _Families, nodes: list[Any], now: float) -> None:
        for node in nodes:
            up = f.gauge("gpuprovider_node_up", "1 when the node answers", ["node"])
            up.add_metric([node.name], 0.0 if node.status == NodeStatus.UNREACHABLE else 1.0)
            for status in NodeStatus:
                if status == NodeStatus.REMOVED:
                    continue
                f.gauge(
                    "gpuprovider_node_status", "1 for the node's status", ["node", "status"]
                ).add_metric([node.name, status.value], float(node.status == status))
            cordoned = node.status in (NodeStatus.CORDONED, NodeStatus.DRAINING)
            f.gauge(
                "gpuprovider_node_cordoned",
                "1 when the node takes no new work by a person's or a rule's decision",
                ["node", "reason"],
            ).add_metric(
                [node.name, _cordon_kind(node.status_reason) if cordoned else ""], float(cordoned)
            )
            f.gauge(
                "gpuprovider_node_heartbeat_timestamp_seconds",
                "when the node last reported",
                ["node"],
            ).add_metric([node.name], node.last_heartbeat)
            for gpu in node.gpus:
                labels = [node.name, gpu.uuid, str(gpu.idx), gpu.model]
                f.gauge(
                    "gpuprovider_gpu_info",
                    "a GPU of the pool",
                    [*GPU_LABELS, "simulated", "driver"],
                ).add_metric([*labels, str(gpu.simulated).lower(), gpu.driver_version], 1.0)
                reason = self.usability.node_reason(node) or self.usability.gpu_reason(gpu, now)
                f.gauge(
                    "gpuprovider_gpu_healthy", "1 when the GPU takes new work", GPU_LABELS
                ).add_metric(labels, 0.0 if reason else 1.0)
                f.gauge(
                    "gpuprovider_gpu_cordoned",
                    "1 when the GPU is cordoned, by a person (operator) or a rule (repair)",
                    [*GPU_LABELS, "reason"],
                ).add_metric(
                    [*labels, _cordon_kind(gpu.cordon_reason) if gpu.cordon_reason else ""],
                    float(bool(gpu.cordon_reason)),
                )
                trusted = gpu.proof_verifier_key in self.usability.trusted_verifiers
                if gpu.proof_passed and gpu.proof_at and trusted:
                    f.gauge(
                        "gpuprovider_proof_last_success_timestamp_seconds",
                        "when the GPU's latest passing proof of GPU, by a trusted verifier, "
                        "was verified",
                        GPU_LABELS,
                    ).add_metric(labels, gpu.proof_at)

    @staticmethod
    def _tasks(
        f: _Families,
        by_state: dict[str, int],
        transitions: dict[str, int],
        failures: dict[str, int],
    ) -> None:
        tasks = f.gauge("gpuprovider_tasks", "tasks by state", ["state"])
        for state, n in sorted(by_state.items()):
            tasks.add_metric([state], n)
        moved = f.counter(
            "gpuprovider_task_transitions", "task transitions, by state entered", ["state"]
        )
        for state, n in sorted(transitions.items()):
            moved.add_metric([state], n)
        kinds: dict[str, int] = {}
        for reason, n in failures.items():
            kind = failure_kind(reason)
            kinds[kind] = kinds.get(kind, 0) + n
        failed = f.counter(
            "gpuprovider_task_failures", "task failures, by kind of reason", ["reason"]
        )
        for kind, n in sorted(kinds.items()):
            failed.add_metric([kind], n)

    def _telemetry(self, f: _Families, nodes: list[Any]) -> None:
        repair = self.repair
        assert repair is not None
        names = {n.id: n.name for n in nodes}
        models = {g.uuid: g.model for n in nodes for g in n.gpus}
        samples = repair.samples()
        for uuid, state in sorted(samples.items()):
            labels = [
                names.get(state.node_id, state.node_id),
                uuid,
                str(state.sample.index),
                models.get(uuid, ""),
            ]
            self._gpu(f, labels, state)
        xids = f.counter(
            "gpuprovider_gpu_xid_errors",
            "XID errors read from the kernel log since the daemon started",
            [*GPU_LABELS, "code"],
        )
        for (node_id, uuid, code), n in sorted(repair.xid_counts().items()):
            sampled = samples.get(uuid)
            index = str(sampled.sample.index) if sampled else ""
            xids.add_metric(
                [names.get(node_id, node_id), uuid, index, models.get(uuid, ""), str(code)], n
            )
        malformed = f.counter(
            "gpuprovider_kernel_log_malformed_lines",
            "kernel log lines naming an XID that could not be read",
            ["node"],
        )
        for node_id, n in sorted(repair.malformed_lines().items()):
            malformed.add_metric([names.get(node_id, node_id)], n)
        alerter = repair.alerter
        f.counter("gpuprovider_alerts_sent", "alert deliveries that succeeded", []).add_metric(
            [], alerter.sent
        )
        f.counter("gpuprovider_alert_failures", "alert deliveries that failed", []).add_metric(
            [], alerter.failed
        )
        fleet = sum(1 for n in nodes for g in n.gpus if g.present)
        f.gauge(
            "gpuprovider_repair_circuit_breaker_open",
            "1 while rules may take no more GPUs out",
            [],
        ).add_metric([], float(repair.breaker_open(fleet)))

    @staticmethod
    def _gpu(f: _Families, labels: list[str], state: Any) -> None:
        s = state.sample

        def gauge(name: str, doc: str, value: float | bool | None) -> None:
            if value is not None:
                f.gauge(name, doc, GPU_LABELS).add_metric(labels, float(value))

        def counter(name: str, doc: str, extra: str, values: dict[str, int]) -> None:
            for key, value in sorted(values.items()):
                f.counter(name, doc, [*GPU_LABELS, extra]).add_metric([*labels, key], value)

        gauge("gpuprovider_gpu_present", "1 while NVML reaches the GPU", s.present)
        gauge("gpuprovider_gpu_utilization_ratio", "GPU busy time, 0 to 1", s.utilization_ratio)
        gauge("gpuprovider_gpu_memory_used_bytes", "GPU memory in use", s.memory_used_bytes)
        gauge("gpuprovider_gpu_memory_total_bytes", "GPU memory", s.memory_total_bytes)
        gauge("gpuprovider_gpu_temperature_celsius", "GPU temperature", s.temperature_c)
        gauge("gpuprovider_gpu_power_watts", "GPU power draw", s.power_w)
        gauge(
            "gpuprovider_gpu_sample_timestamp_seconds",
            "when the GPU was last sampled",
            state.at,
        )
        for key, value in sorted(s.ecc.items()):
            kind, scope = key.split("_", 1)
            f.counter(
                "gpuprovider_gpu_ecc_errors",
                "ECC errors as the driver counts them (volatile: since the driver loaded)",
                [*GPU_LABELS, "type", "scope"],
            ).add_metric([*labels, kind, scope], value)
        counter(
            "gpuprovider_gpu_retired_pages",
            "retired memory pages, by cause",
            "cause",
            s.retired_pages,
        )
        gauge(
            "gpuprovider_gpu_retired_pages_pending",
            "1 when a page retirement waits for a reset",
            s.retired_pages_pending,
        )
        counter(
            "gpuprovider_gpu_remapped_rows",
            "remapped memory rows, by kind",
            "type",
            s.remapped_rows,
        )
        gauge(
            "gpuprovider_gpu_row_remap_pending",
            "1 when a row remap waits for a reset",
            s.row_remap_pending,
        )
        gauge(
            "gpuprovider_gpu_row_remap_failure",
            "1 when a row remap failed",
            s.row_remap_failure,
        )
        if s.clock_event_reasons is not None:
            for reason, bit in CLOCK_EVENT_REASONS.items():
                f.gauge(
                    "gpuprovider_gpu_clock_event_active",
                    "1 while the reason holds the GPU's clocks down (throttling)",
                    [*GPU_LABELS, "reason"],
                ).add_metric([*labels, reason], float(bool(s.clock_event_reasons & bit)))
        if s.pcie_replays is not None:
            f.counter("gpuprovider_gpu_pcie_replays", "PCIe replays", GPU_LABELS).add_metric(
                labels, s.pcie_replays
            )
        counter(
            "gpuprovider_gpu_nvlink_errors",
            "NVLink errors summed over links",
            "type",
            s.nvlink_errors,
        )


class Metrics:
    """The registry /metrics renders, and the instruments loops observe."""

    def __init__(self, store: Store, usability: Usability, repair: RepairService | None):
        self.registry = CollectorRegistry(auto_describe=False)
        self.queue_wait = Histogram(
            "gpuprovider_queue_wait_seconds",
            "time from queued to placed",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400),
            registry=self.registry,
        )
        self.scheduler_pass = Histogram(
            "gpuprovider_scheduler_pass_seconds",
            "time of one scheduler pass",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.registry.register(ProviderCollector(store, usability, repair))

    def render(self) -> bytes:
        return generate_latest(self.registry)
