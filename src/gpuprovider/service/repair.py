"""Watch and repair: what the telemetry loop does with each round of node reports.

Keeps the latest sample and a short history per GPU (for the API, the dashboard and
/metrics), counts booked and idle GPU-seconds, runs the repair rules and applies what
they find: each action an event with the rule and its evidence (`repair_events`),
disruptive ones only within the circuit breaker, none at all in dry-run."""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from gpuprovider.domain.nodes import NodeStatus
from gpuprovider.domain.records import GpuRecord, NodeRecord, TokenRecord
from gpuprovider.domain.repair import RepairAction
from gpuprovider.domain.states import ALLOCATED, TaskState
from gpuprovider.lifecycle import nodes as node_lifecycle
from gpuprovider.lifecycle.tasks import transition
from gpuprovider.service.errors import NotFound, Rejected
from gpuprovider.store.repairs import DAY_S
from gpuprovider.store.store import Store, Tx
from gpuprovider.telemetry.alerts import Alert, Alerter
from gpuprovider.telemetry.gpus import GpuSample
from gpuprovider.telemetry.history import STEP_S, History
from gpuprovider.telemetry.node import NodeTelemetry
from gpuprovider.telemetry.rules import (
    DISRUPTIVE,
    CircuitBreaker,
    Finding,
    RepairRule,
    RuleEngine,
)

log = logging.getLogger(__name__)

# A GPU cordon that a rule set starts with this; only a passing check lifts it.
REPAIR_CORDON = "repair rule "
RESET_TIMEOUT_S = 120.0
A = RepairAction


class Outcome(StrEnum):
    """What an action of a rule came to, as `repair events` shows it."""

    DONE = "done"
    ALREADY = "already"  # the subject was out already
    PENDING = "pending"  # a reset waiting for the GPU to be idle
    SKIPPED = "skipped"  # nothing to act on (no such GPU, another node's reset)
    REFUSED = "refused"  # the lifecycle refused it (a node still running work)
    FAILED = "failed"
    DRY_RUN = "dry-run"
    BREAKER_OPEN = "breaker-open"
    SENT = "sent"  # an alert
    NO_TARGET = "no-target"  # an alert with nowhere to go
    SUPPRESSED = "suppressed"  # an alert sent already and not due again


@dataclass(frozen=True)
class Target:
    """What a disruptive action acts on, and why."""

    finding: Finding
    node: NodeRecord
    gpu: GpuRecord | None
    where: str  # as people read it: node name, GPU index and UUID

    @property
    def reason(self) -> str:
        return f"{REPAIR_CORDON}{self.finding.rule.name}: {_summary(self.finding.evidence)}"


@dataclass
class RepairSettings:
    rules: list[RepairRule]
    dry_run: bool = False
    breaker_max_pct: float = 25.0
    breaker_window_s: float = 600.0
    reset_command: list[str] = field(default_factory=list)
    local_node_id: str = ""  # reset_gpu runs here only


@dataclass
class GpuState:
    node_id: str
    sample: GpuSample
    at: float


def _node_level(rule: RepairRule) -> bool:
    """Whether the rule acts on a whole node (else on the GPU its evidence names)."""
    return rule.signal == "node_unreachable" or bool({A.CORDON_NODE, A.DRAIN} & set(rule.actions))


def _summary(evidence: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in evidence.items() if k != "text")[:300]


class RepairService:
    def __init__(self, store: Store, settings: RepairSettings, alerter: Alerter):
        self.store, self.settings, self.alerter = store, settings, alerter
        self.engine = RuleEngine(settings.rules)
        self.breaker = CircuitBreaker(settings.breaker_max_pct, settings.breaker_window_s)
        self.history = History()
        self.latest: dict[str, GpuState] = {}  # GPU UUID -> its latest sample
        # read by /metrics on another thread: changed and copied under the lock
        self._xids: Counter[tuple[str, str, int]] = Counter()  # (node, GPU, code) -> seen
        self._malformed: dict[str, int] = {}  # node -> kernel log lines unread
        self._unreachable_since: dict[str, float] = {}
        self._pending_resets: dict[str, Finding] = {}  # GPU UUID -> why
        self._accounted_at: float | None = None
        self._lock = threading.Lock()  # the API reads what the loop writes

    # -- one round of reports ------------------------------------------------------

    def observe(self, reports: list[NodeTelemetry], now: float) -> list[Finding]:
        findings: list[Finding] = []
        for report in reports:
            with self._lock:
                self._malformed[report.node_id] = report.kernel_log_malformed
                for seen in report.xids:
                    self._xids[(report.node_id, seen.gpu_uuid, seen.xid.code)] += 1
            if report.samples is not None:
                with self._lock:
                    for sample in report.samples:
                        self.latest[sample.uuid] = GpuState(report.node_id, sample, report.at)
                        if sample.present:
                            self.history.add(report.at, sample)
                findings += self.engine.observe_gpus(report.node_id, report.at, report.samples)
            if report.xids:
                for seen in report.xids:
                    log.warning(
                        "XID %d on node %s GPU %s: %s",
                        seen.xid.code,
                        report.node_id,
                        seen.gpu_uuid or seen.xid.pci_bus_id,
                        seen.xid.text,
                    )
                findings += self.engine.observe_xids(
                    report.node_id, report.at, [(s.xid, s.gpu_uuid) for s in report.xids]
                )
        with self.store.read() as r:  # every second: statuses only
            statuses = r.nodes.status_of()
        for node_id, status in statuses.items():
            if status == NodeStatus.UNREACHABLE:
                self._unreachable_since.setdefault(node_id, now)
            else:
                self._unreachable_since.pop(node_id, None)
        findings += self.engine.observe_nodes(now, self._unreachable_since)
        if not findings:
            self._reset_idle(now)
            return findings
        with self.store.read() as r:
            nodes = r.nodes.list()
        for finding in findings:
            try:
                self.act(finding, nodes, now)
            except Exception:
                log.exception("repair rule %s failed to act", finding.rule.name)
        self._reset_idle(now)
        return findings

    # -- acting on a finding ---------------------------------------------------------

    def act(self, finding: Finding, nodes: list[NodeRecord], now: float) -> None:
        rule = finding.rule
        node = next((n for n in nodes if n.id == finding.node_id), None)
        gpu = next((g for g in node.gpus if g.uuid == finding.gpu_uuid), None) if node else None
        where = (node.name if node else finding.node_id) + (
            f" GPU {gpu.idx} ({gpu.uuid})" if gpu else ""
        )
        if finding.new:
            log.warning(
                "repair rule %s holds on %s: %s", rule.name, where, _summary(finding.evidence)
            )
        disruptive = [a for a in rule.actions if a in DISRUPTIVE]
        allowed, why_not = True, ""
        if disruptive and gpu is None and not _node_level(rule):
            # e.g. an XID whose PCI address is no GPU NVML reported: nothing to take out
            allowed, why_not = False, "skipped: the evidence names no GPU of this node"
        elif disruptive and finding.new:
            allowed, why_not = self._may_disrupt(finding, node, gpu, nodes, now)
        for action in rule.actions:
            if action in DISRUPTIVE and not finding.new:
                continue  # done when the rule started to hold
            if action == A.ALERT:
                self._alert(finding, where, disruptive, allowed, why_not)
                continue
            if action == A.WARN:
                if finding.new:
                    self._record(finding, action, Outcome.DONE, f"warned: {where}")
                continue
            if self.settings.dry_run:
                self._record(finding, action, Outcome.DRY_RUN, f"would {action} {where}")
            elif not allowed:
                skipped = why_not.startswith("skipped")
                self._record(
                    finding, action, Outcome.SKIPPED if skipped else Outcome.BREAKER_OPEN, why_not
                )
            else:
                outcome, detail = self._do(action, finding, node, gpu, where)
                self._record(finding, action, outcome, detail)

    def _may_disrupt(
        self,
        finding: Finding,
        node: NodeRecord | None,
        gpu: Any,
        nodes: list[NodeRecord],
        now: float,
    ) -> tuple[bool, str]:
        """Whether the circuit breaker lets this finding take its subject out."""
        if self.settings.dry_run or node is None:
            return True, ""
        if gpu is not None and not _node_level(finding.rule):
            out, cost = bool(gpu.cordon_reason), 1
        else:
            out = node.status != NodeStatus.READY
            cost = sum(1 for g in node.gpus if g.present and not g.cordon_reason)
        fleet = sum(1 for n in nodes for g in n.gpus if g.present)
        if out or cost == 0 or self.breaker.allow(now, fleet, cost):
            return True, ""
        limit = self.breaker.limit(fleet)
        why = (
            f"circuit breaker open: rules took {self.breaker.used(now)} of {fleet} GPUs out "
            f"within {self.breaker.window_s:g}s (limit {limit}); this needs a person"
        )
        self.alerter.send(
            Alert(
                key="circuit-breaker",
                title="repair circuit breaker open",
                text=f"{why}; held back: rule {finding.rule.name} on {finding.node_id}",
                severity="critical",
                labels={"rule": finding.rule.name},
            )
        )
        return False, why

    def _do(
        self, action: RepairAction, finding: Finding, node: NodeRecord | None, gpu: Any, where: str
    ) -> tuple[Outcome, str]:
        if node is None:
            return Outcome.SKIPPED, f"node {finding.node_id} is not known"
        target = Target(finding, node, gpu, where)
        if action == A.RESET_GPU:  # runs later, outside any transaction
            if gpu is None:
                return Outcome.SKIPPED, "the finding names no GPU"
            self._pending_resets[gpu.uuid] = finding
            return Outcome.PENDING, f"reset of {where} once no task holds it"
        with self.store.tx() as tx:
            return ACTIONS[action](tx, target)

    def _reset_idle(self, now: float) -> None:
        """Reset each GPU waiting for it once no task holds it (local node only)."""
        if not self._pending_resets:
            return
        with self.store.read() as r:
            busy = {u for a in r.tasks.active_allocations() for u in a.gpu_uuids}
        for uuid, finding in list(self._pending_resets.items()):
            if uuid in busy:
                continue
            del self._pending_resets[uuid]
            state = self.latest.get(uuid)
            if finding.node_id != self.settings.local_node_id:
                why = "GPU resets run on the daemon's own node only"
                self._record(finding, A.RESET_GPU, Outcome.SKIPPED, why)
                continue
            index = state.sample.index if state else -1
            command = [
                part.replace("{uuid}", uuid).replace("{index}", str(index))
                for part in self.settings.reset_command
            ]
            try:
                done = subprocess.run(
                    command, capture_output=True, text=True, timeout=RESET_TIMEOUT_S, check=False
                )
                outcome = Outcome.DONE if done.returncode == 0 else Outcome.FAILED
                said = (done.stdout + done.stderr).strip()[:300]
                detail = f"{' '.join(command)}: exit {done.returncode} {said}"
            except (OSError, subprocess.TimeoutExpired) as exc:
                outcome, detail = Outcome.FAILED, f"{' '.join(command)}: {exc}"
            self._record(finding, A.RESET_GPU, outcome, detail)

    def _alert(
        self,
        finding: Finding,
        where: str,
        disruptive: list[RepairAction],
        allowed: bool,
        why_not: str,
    ) -> None:
        rule = finding.rule
        took = ""
        if disruptive:
            if self.settings.dry_run:
                took = f"; dry run: would {', '.join(disruptive)}"
            elif not allowed:
                took = f"; held back: {why_not}"
            else:
                took = f"; actions: {', '.join(disruptive)}"
        queued = self.alerter.send(
            Alert(
                key=finding.key,
                title=f"{rule.name} on {where}",
                text=f"{rule.signal}: {_summary(finding.evidence)}{took}",
                severity="critical" if disruptive else "warning",
                labels={
                    "rule": rule.name,
                    "node": finding.node_id,
                    "gpu_uuid": finding.gpu_uuid,
                },
            )
        )
        if finding.new:
            if queued:
                outcome = Outcome.SENT
            else:
                outcome = Outcome.SUPPRESSED if self.alerter.configured else Outcome.NO_TARGET
            self._record(finding, A.ALERT, outcome, f"alert {rule.name} on {where}")

    def _record(
        self, finding: Finding, action: RepairAction, outcome: Outcome, detail: str
    ) -> None:
        with self.store.tx() as tx:
            tx.repairs.record(
                finding.node_id,
                finding.gpu_uuid,
                finding.rule.name,
                finding.rule.signal,
                action.value,
                outcome.value,
                detail,
                finding.evidence,
            )

    # -- accounting ------------------------------------------------------------------

    def account(self, now: float, max_gap_s: float) -> None:
        """Add the GPU-seconds since the last call to each (tenant, model): booked by an
        allocation, and idle when its GPU was last sampled at utilisation 0 (a GPU with
        no sample, a simulated one, is booked but never idle). A gap longer than
        `max_gap_s` (the daemon was down) counts as `max_gap_s`."""
        last, self._accounted_at = self._accounted_at, now
        if last is None:
            return
        dt = min(now - last, max_gap_s)
        with self.store.read() as r:
            allocations = r.tasks.active_allocations()
            tenants = {t.id: t.tenant for t in r.tasks.find(states=sorted(ALLOCATED))}
            models = {g.uuid: g.model for n in r.nodes.list() for g in n.gpus}
        booked: dict[tuple[str, str], list[float]] = {}
        with self._lock:
            for allocation in allocations:
                tenant = tenants.get(allocation.task_id)
                if tenant is None:
                    continue
                for uuid in allocation.gpu_uuids:
                    seconds = dt * allocation.gpu_milli / 1000
                    entry = booked.setdefault((tenant, models.get(uuid, "unknown")), [0.0, 0.0])
                    entry[0] += seconds
                    state = self.latest.get(uuid)
                    if state and state.sample.present and state.sample.utilization_ratio == 0:
                        entry[1] += seconds
        if booked:
            with self.store.tx() as tx:
                tx.repairs.add_usage(now, {k: (v[0], v[1]) for k, v in booked.items()})

    # -- reads for the API and /metrics ---------------------------------------------

    def samples(self) -> dict[str, GpuState]:
        with self._lock:
            return dict(self.latest)

    def xid_counts(self) -> dict[tuple[str, str, int], int]:
        with self._lock:
            return dict(self._xids)

    def malformed_lines(self) -> dict[str, int]:
        with self._lock:
            return dict(self._malformed)

    def breaker_open(self, fleet_gpus: int) -> bool:
        return self.breaker.is_open(time.time(), fleet_gpus)

    # -- what the API and CLI show -----------------------------------------------------

    def events(
        self, node: str | None = None, gpu_uuid: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """What rules did, the latest first: everywhere, on one node (name or id), or
        on one GPU."""
        with self.store.read() as r:
            node_id = None
            if node is not None:
                found = r.nodes.get(node)
                if found is None:
                    raise NotFound(f"no node {node!r}; `gpuprovider node list` shows them")
                node_id = found.id
            return r.repairs.events(node_id, gpu_uuid, limit)

    def rules(self) -> dict[str, Any]:
        return {
            "dry_run": self.settings.dry_run,
            "breaker_max_pct": self.settings.breaker_max_pct,
            "breaker_window_s": self.settings.breaker_window_s,
            "rules": [rule.model_dump() for rule in self.settings.rules],
        }

    def accounting(self, who: TokenRecord, days: float | None) -> list[dict[str, Any]]:
        """Booked and idle GPU-hours per tenant and model over the last `days` (whole
        UTC days; all when None). A tenant sees its own only."""
        since = None if days is None else time.time() - days * DAY_S
        with self.store.read() as r:
            rows = r.repairs.usage(since)
        return [
            {
                "tenant": tenant,
                "model": model,
                "booked_gpu_hours": booked_s / 3600,
                "idle_gpu_hours": idle_s / 3600,
                "idle_ratio": idle_s / booked_s if booked_s else 0.0,
            }
            for tenant, model, booked_s, idle_s in sorted(rows)
            if who.is_admin or tenant == who.tenant
        ]

    def gpu_history(self, uuid: str) -> dict[str, Any]:
        with self.store.read() as r:
            if r.nodes.gpu(uuid) is None:
                raise NotFound(f"no GPU {uuid!r}; `gpuprovider gpu list` shows them")
        return {"gpu_uuid": uuid, "step_s": STEP_S, "points": self.history.of(uuid)}

    def test_alert(self, who: TokenRecord) -> dict[str, Any]:
        """Send a test alert to every target now and say how each went."""
        if not self.alerter.configured:
            raise Rejected(
                "no alert target: set [alerts] webhooks or [alerts.smtp] in provider.toml"
            )
        alert = Alert(
            key=f"test/{time.time()}",
            title="gpuprovider test alert",
            text=f"sent by {who.name} with `gpuprovider alert test`; alerts reach you",
            severity="info",
        )
        return {"deliveries": [asdict(d) for d in self.alerter.deliver(alert)]}


# -- the disruptive actions, each a function of its own ---------------------------------


def _cordon_gpu(tx: Tx, target: Target) -> tuple[Outcome, str]:
    if target.gpu is None:
        return Outcome.SKIPPED, "the finding names no GPU of this node"
    current = tx.nodes.gpu(target.gpu.uuid)
    if current and current.cordon_reason:
        return Outcome.ALREADY, f"cordoned already: {current.cordon_reason}"
    node_lifecycle.gpu_cordon(tx, target.gpu.uuid, target.reason)
    return Outcome.DONE, f"cordoned {target.where}"


def _set_node(status: NodeStatus) -> Callable[[Tx, Target], tuple[Outcome, str]]:
    def act(tx: Tx, target: Target) -> tuple[Outcome, str]:
        current = tx.nodes.get(target.node.id)
        if current is None or current.status == status:
            return Outcome.ALREADY, f"node is {status} already"
        rule = target.finding.rule
        try:
            node_lifecycle.operator_sets(
                tx, current, status, f"repair rule {rule.name}", _summary(target.finding.evidence)
            )
        except node_lifecycle.Refused as exc:
            return Outcome.REFUSED, str(exc)
        return Outcome.DONE, f"{status} {target.node.name}"

    return act


def _reschedule(tx: Tx, target: Target) -> tuple[Outcome, str]:
    """Stop the GPU's (or, without one, the node's) tasks; they are re-queued like
    preempted work and placed elsewhere (the cordon keeps them off this GPU)."""
    node, gpu, rule = target.node, target.gpu, target.finding.rule
    allocations = [
        a
        for a in tx.tasks.active_allocations()
        if a.node_id == node.id and (gpu is None or gpu.uuid in a.gpu_uuids)
    ]
    moved = []
    for allocation in allocations:
        task = tx.tasks.get(allocation.task_id)
        if task is None:
            continue
        what = f"GPU {gpu.idx}" if gpu else "node"
        why = f"moved: {what} on {node.name} failed repair rule {rule.name}"
        if task.state == TaskState.RUNNING:
            transition(tx, task, TaskState.PREEMPTED, why)
        elif task.state == TaskState.SCHEDULED:
            transition(tx, task, TaskState.QUEUED, why)
        else:
            continue
        moved.append(task.label)
    return Outcome.DONE, f"moved {', '.join(moved)}" if moved else "no task to move"


# The disruptive actions done in a transaction (reset_gpu waits for an idle GPU; warn
# and alert take nothing out), by name: a new action is a function here and a name in
# domain/repair.py's RepairAction.
ACTIONS: dict[RepairAction, Callable[[Tx, Target], tuple[Outcome, str]]] = {
    A.CORDON_GPU: _cordon_gpu,
    A.CORDON_NODE: _set_node(NodeStatus.CORDONED),
    A.DRAIN: _set_node(NodeStatus.DRAINING),
    A.REMOVE_NODE: _set_node(NodeStatus.REMOVED),  # a lost node; refused while work is there
    A.RESCHEDULE: _reschedule,
}
