"""The placement pipeline: filter -> score -> select -> reserve, each a named
extension point that policies plug into.

- a *filter* marks the nodes that can take a task, and says why the others cannot;
- a *scorer* ranks the nodes left (higher is better) and may choose GPUs too;
- *select* takes the best score: the first such node, or a random one when the
  policy asks for random ties (as kube-scheduler does);
- a *GPU picker* chooses devices on the chosen node when the scorer did not;
- *reserve* records the placement in the cluster state so the next task sees it.

A filter's verdict and a scorer's score on a node must depend only on that node and the
task. The framework relies on it: per task shape it keeps each node's verdict and score,
and recomputes them only for the nodes reserved on since (from the state's change log),
so a decision costs one pass over a flat array rather than the plugins' work on every
node. When many nodes need scoring at once (a shape's first look), nodes in equal
states (same hardware, labels and free resources) are scored once.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from gpuprovider.scheduler.fragmentation import TYPICAL_COVERAGE, FragTracker, TypicalTasks
from gpuprovider.scheduler.model import (
    Decision,
    Placement,
    Preemption,
    RunningTask,
    Snapshot,
    TaskRequest,
    Unplaced,
)
from gpuprovider.scheduler.state import ALL, ClusterState, CompiledTask, row_count

# What a plugin's verdict or score depends on besides the node: the part of the task
# it reads, as a hashable value. Tasks that sign alike share kept verdicts and scores;
# a plugin that cannot say returns None, and then nothing is kept for the task.
Signer = Callable[[CompiledTask], Hashable | None]


def signs_nothing(task: CompiledTask) -> tuple[Hashable, ...]:
    return ()


def signs_resources(task: CompiledTask) -> tuple[Hashable, ...]:
    """For plugins that read what the task takes: CPU, memory, GPUs and share."""
    return (task.cpu, task.memory, task.count, task.milli)


def signs_gpu_fit(task: CompiledTask) -> tuple[Hashable, ...]:
    """What `fitting` (the GPUs with room, handed to every plugin) depends on."""
    gpu = task.request.gpu
    return (task.count, task.milli, gpu.models, gpu.min_memory_gb, gpu.max_memory_gb)


@dataclass(frozen=True)
class Filter:
    name: str
    # bool[len(rows)]: which of the nodes `rows` (indices, or slice(None): all) pass.
    # `fitting` is bool[len(rows), G]: their GPUs with room for the task.
    check: Callable[[ClusterState, CompiledTask, np.ndarray | slice, np.ndarray], np.ndarray]
    # Why the nodes given fail, in words a user can act on: reason -> how many nodes.
    reason: Callable[[ClusterState, CompiledTask, np.ndarray], dict[str, int]]
    # The part of the task `check` reads (see Signer).
    signs: Signer
    # True: the verdict depends only on what a node is (labels, usability), never on
    # what is free, so a task shape asks it once per node.
    static: bool = False


@dataclass
class Context:
    """What a scorer or GPU picker may look at for one task."""

    state: ClusterState
    task: CompiledTask
    framework: Framework

    def fitting(self, rows: np.ndarray | int) -> np.ndarray:
        """bool[..., G]: the GPUs of nodes `rows` with room for the task now."""
        return self.state.fitting_gpus(self.task, rows)

    def fragmentation(self) -> FragTracker:
        return self.framework.frag_tracker(self.state)


@dataclass
class Scores:
    values: np.ndarray  # one per candidate node; higher is better
    share_gpu: np.ndarray | None = None  # for a share: the GPU slot chosen per candidate


Scorer = Callable[[Context, np.ndarray], Scores]
GpuPicker = Callable[[Context, int], list[int]]


@dataclass
class Policy:
    name: str
    scorer: Scorer
    pick_gpus: GpuPicker
    filters: Sequence[Filter] = ()
    random_ties: bool = False
    # Fragmentation-aware policies plan for typical tasks: the most common shapes that
    # cover this share of the tasks seen. None: the policy does not use them.
    typical_coverage: float | None = None
    # Whether typical tasks carry their memory, so a node short of memory counts as
    # fragmented for them (the paper's FGD reads CPU and GPUs only).
    typical_memory: bool = False
    description: str = ""
    # The part of the task the scorer reads (see Signer).
    scorer_signs: Signer = signs_resources

    def shape_key(self, task: CompiledTask) -> tuple[Hashable, ...] | None:
        """The key under which a task's verdicts and scores are kept: every plugin's
        signature, or None when one cannot sign."""
        parts = [signs_gpu_fit(task), self.scorer_signs(task)]
        parts += [check.signs(task) for check in self.filters]
        return None if any(p is None for p in parts) else tuple(parts)

    @property
    def needs_typical_tasks(self) -> bool:
        return self.typical_coverage is not None

    def typical_tasks(self, tasks: Iterable[TaskRequest]) -> TypicalTasks:
        """The typical tasks this policy plans for, from the tasks seen."""
        return TypicalTasks.from_tasks(
            tasks, self.typical_coverage or TYPICAL_COVERAGE, self.typical_memory
        )


# Task shapes whose per-node verdicts and scores are kept, most recently used.
SHAPES_KEPT = 256
# From this many nodes to score at once, nodes in equal states are scored once.
SCORE_DISTINCT_FROM = 32


class ShapeCache:
    """What one task shape sees on every node: its score there (-inf where the node
    fails a filter) and the GPU its scorer chose for a share, each computed when the
    node last changed."""

    def __init__(self, n: int):
        self.score = np.full(n, -np.inf)
        self.share_gpu = np.full(n, -1, dtype=np.int64)  # -1: left to the GPU picker
        self.static_ok: np.ndarray | None = None  # static filters' verdict per node
        self.seen = -1  # position in the state's change log at the last look

    def refresh(self, context: Context, policy: Policy) -> None:
        """Filter and score again the nodes changed since this shape last looked."""
        state, task = context.state, context.task
        changed = state.changed_since(self.seen)
        self.seen = len(state.changes)
        if not len(changed):
            return
        fitting = state.fitting_gpus(task, changed)
        if self.static_ok is None:  # the first look: `changed` is every node
            self.static_ok = np.ones(len(state), dtype=bool)
            for check in policy.filters:
                if check.static:
                    self.static_ok &= check.check(state, task, changed, fitting)
        ok = self.static_ok[changed]
        for check in policy.filters:
            if not check.static:
                ok &= check.check(state, task, changed, fitting)
        self.score[changed[~ok]] = -np.inf
        passing = changed[ok]
        if not len(passing):
            return
        spread: np.ndarray | slice
        if len(passing) >= SCORE_DISTINCT_FROM:  # a first look: score each state once
            scored, spread = state.distinct(passing)
        else:
            scored, spread = passing, slice(None)
        fresh = policy.scorer(context, scored)
        self.score[passing] = fresh.values[spread]
        if fresh.share_gpu is not None:
            self.share_gpu[passing] = fresh.share_gpu[spread]

    def best(self, policy: Policy, rng: np.random.Generator) -> int | None:
        """The node to take: the first of the best scores in node order, or any of them
        with random ties; None when there is none or every node fails a filter."""
        if not len(self.score):
            return None
        first = int(self.score.argmax())
        top = self.score[first]
        if top == -np.inf:
            return None
        if not policy.random_ties:
            return first
        best = np.nonzero(self.score == top)[0]
        return int(best[rng.integers(len(best))])


@dataclass
class Framework:
    policy: Policy
    # The task shapes fragmentation-aware policies plan for. None: the tasks of each
    # `place` call stand in for them.
    typical: TypicalTasks | None = None
    seed: int = 0
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self._trackers: dict[int, FragTracker] = {}
        self._shape_caches: dict[
            int, tuple[ClusterState, OrderedDict[tuple[Hashable, ...], ShapeCache]]
        ] = {}
        self._typical_now = self.typical

    # -- entry points -----------------------------------------------------------

    def place(
        self, snapshot: Snapshot, tasks: Sequence[TaskRequest], preempt: bool = True
    ) -> list[Decision]:
        """Place tasks in the order given (the caller orders them by priority).

        A gang's members are placed together when the first of them comes up. A
        task or gang that fits nowhere may preempt lower-priority preemptible work.
        """
        state = ClusterState.from_snapshot(snapshot)
        self._typical_now = self.typical
        if self.policy.needs_typical_tasks and self.typical is None and tasks:
            self._typical_now = self.policy.typical_tasks(tasks)
        running = {r.task_id: r for r in snapshot.running} if preempt else {}
        gangs: dict[str, list[TaskRequest]] = {}
        for task in tasks:
            if task.gang:
                gangs.setdefault(task.gang, []).append(task)
        decisions: dict[str, Decision] = {}
        # Free room only shrinks during a pass (until a preemption frees some): a task
        # shaped like one found to fit nowhere fits nowhere either, and says so at once.
        nowhere: dict[tuple[Hashable, ...], str] = {}
        for task in tasks:
            if task.task_id in decisions:
                continue
            if task.gang:
                for decision in self.place_gang(state, task.gang, gangs[task.gang], running):
                    decisions[decision.task_id] = decision
                continue
            compiled = state.compile(task)
            shape = self.policy.shape_key(compiled)
            key = (shape, task.priority) if running and shape is not None else shape
            if key is not None and key in nowhere:
                decisions[task.task_id] = Unplaced(task.task_id, nowhere[key])
                continue
            decision = self.decide(state, task, compiled, shape)
            if isinstance(decision, Unplaced) and running:
                decision = self.preempt(state, task, running) or decision
            if isinstance(decision, Unplaced) and key is not None:
                nowhere[key] = decision.reason
            elif isinstance(decision, Preemption):
                nowhere.clear()
            decisions[task.task_id] = decision
        for decision in decisions.values():
            if isinstance(decision, Placement):
                reserve(snapshot, decision)
        self._trackers.clear()
        self._shape_caches.clear()
        return [decisions[t.task_id] for t in tasks]

    def place_gang(
        self,
        state: ClusterState,
        name: str,
        members: Sequence[TaskRequest],
        running: dict[str, RunningTask] | None = None,
    ) -> list[Decision]:
        """All members placed, or none (and every member says why).

        With `running` given, a member that fits nowhere may preempt. Then no member
        starts yet: each waits (its room stays reserved for this pass) until the
        victims have stopped, and the next pass places the gang whole. Each member's
        decision names the victims it needs; the others name none.
        """
        running = {} if running is None else running
        size = members[0].gang_size or len(members)
        if len(members) < size:
            why = f"gang {name}: {len(members)} of its {size} members queued; waiting for the rest"
            return [Unplaced(m.task_id, why) for m in members]
        placed: list[Placement] = []
        evicted: list[RunningTask] = []
        victims_of: dict[str, tuple[str, ...]] = {}  # member -> the victims it needs
        for member in members:
            decision = self.decide(state, member)
            if isinstance(decision, Unplaced) and running:
                made = self._make_room(state, member, running)
                if made is not None:
                    decision, victims = made
                    evicted += victims
                    victims_of[member.task_id] = tuple(v.task_id for v in victims)
            if not isinstance(decision, Placement):
                for done in placed:
                    state.unreserve(done)
                for victim in evicted:  # nobody is evicted for a gang that cannot start
                    state.reserve_running(victim)
                    running[victim.task_id] = victim
                why = f"gang {name} ({size} members) does not fit at once: {decision.reason}"
                return [Unplaced(m.task_id, why) for m in members]
            placed.append(decision)
        if not evicted:
            return list(placed)
        names = ", ".join(v.task_id for v in evicted)
        why = f"gang {name} waits for {names} (lower priority) to stop"
        return [
            Preemption(p.task_id, p.node_id, victims_of.get(p.task_id, ()), why) for p in placed
        ]

    def preempt(
        self, state: ClusterState, task: TaskRequest, running: dict[str, RunningTask]
    ) -> Preemption | None:
        """Evict preemptible work of lower priority to make room for `task`, or None
        when no eviction would (see `_make_room`)."""
        made = self._make_room(state, task, running)
        if made is None:
            return None
        placement, victims = made
        names = ", ".join(v.task_id for v in victims)
        node = state.nodes[state.index[placement.node_id]].name
        return Preemption(
            task.task_id,
            placement.node_id,
            tuple(v.task_id for v in victims),
            f"waiting for {names} (lower priority) to stop on {node}",
        )

    def _make_room(
        self, state: ClusterState, task: TaskRequest, running: dict[str, RunningTask]
    ) -> tuple[Placement, list[RunningTask]] | None:
        """Choose the node whose victims lose the least (fewest tasks, then lowest
        priority, then least progress), release them and reserve the task there.

        A gang is evicted whole, wherever its members run: it lives and ends together.
        The victims leave `running`, so later tasks in the same pass neither count on
        those resources nor pick the same victims.
        """
        units: dict[str, list[RunningTask]] = {}
        for work in running.values():
            units.setdefault(f"gang {work.gang}" if work.gang else work.task_id, []).append(work)
        by_node: dict[int, list[list[RunningTask]]] = {}
        for unit in units.values():
            if all(v.preemptible and v.priority < task.priority for v in unit):
                for node in {state.index[v.node_id] for v in unit}:
                    by_node.setdefault(node, []).append(unit)
        best: tuple[tuple[Hashable, ...], int, list[RunningTask]] | None = None
        for node, candidates in by_node.items():
            # lowest priority first; then the smallest; of equals, the latest started
            # (least progress lost)
            candidates.sort(
                key=lambda u: (max(v.priority for v in u), len(u), -max(v.started_at for v in u))
            )
            chosen = self._victims_on(state, task, node, candidates)
            if chosen is None:
                continue
            cost = (
                len(chosen),
                max(v.priority for v in chosen),
                -sum(v.started_at for v in chosen),
            )
            if best is None or cost < best[0]:
                best = (cost, node, chosen)
        if best is None:
            return None
        _, node, chosen = best
        for victim in chosen:
            state.release_running(victim)
            del running[victim.task_id]
        placement = self.decide(state, task)
        assert isinstance(placement, Placement), "victims were chosen so that the task fits"
        return placement, chosen

    def _victims_on(
        self, state: ClusterState, task: TaskRequest, node: int, units: list[list[RunningTask]]
    ) -> list[RunningTask] | None:
        """The fewest of `units` (taken in order) whose eviction lets `task` fit on
        `node`, as the tasks they stop."""
        chosen: list[list[RunningTask]] = []
        fits = False
        for unit in units:
            for victim in unit:
                state.release_running(victim)
            chosen.append(unit)
            if self._fits(state, task, node):
                fits = True
                break
        if fits:  # drop any unit the task turns out not to need
            for unit in list(chosen[:-1]):
                for victim in unit:
                    state.reserve_running(victim)
                if self._fits(state, task, node):
                    chosen.remove(unit)
                else:
                    for victim in unit:
                        state.release_running(victim)
        stopped = [victim for unit in chosen for victim in unit]
        for victim in stopped:
            state.reserve_running(victim)
        return stopped if fits else None

    def _fits(self, state: ClusterState, task: TaskRequest, node: int) -> bool:
        compiled = state.compile(task)
        rows = np.array([node])
        fitting = state.fitting_gpus(compiled, rows)
        return all(bool(f.check(state, compiled, rows, fitting)[0]) for f in self.policy.filters)

    def place_one(self, snapshot: Snapshot, task: TaskRequest) -> Decision:
        return self.place(snapshot, [task])[0]

    def decide(
        self,
        state: ClusterState,
        request: TaskRequest,
        compiled: CompiledTask | None = None,
        key: tuple[Hashable, ...] | None = None,
    ) -> Decision:
        """Place one task on `state` and reserve it there, or say why not. `compiled` and
        its shape `key` may be given when the caller has them already."""
        task = compiled or state.compile(request)
        context = Context(state, task, self)
        cache = self.shape_cache(state, task, key)
        cache.refresh(context, self.policy)
        node = cache.best(self.policy, self.rng)
        if node is None:
            return Unplaced(request.task_id, self.explain(state, task))
        chosen = int(cache.share_gpu[node])
        gpus = [chosen] if chosen >= 0 else self.policy.pick_gpus(context, node)
        state.reserve(node, gpus, task.milli, task.cpu, task.memory)
        if request.pool is not None:
            state.take_pool(node, request.pool[0])
        view = state.nodes[node]
        return Placement(
            task_id=request.task_id,
            node_id=view.id,
            gpu_uuids=tuple(view.gpus[j].uuid for j in gpus),
            gpu_milli=task.milli,
            cpu_milli=task.cpu,
            memory_mib=task.memory,
        )

    def shape_cache(
        self, state: ClusterState, task: CompiledTask, key: tuple[Hashable, ...] | None = None
    ) -> ShapeCache:
        held = self._shape_caches.get(id(state))
        if held is None or held[0] is not state:
            held = self._shape_caches[id(state)] = (state, OrderedDict())
        caches = held[1]
        key = key if key is not None else self.policy.shape_key(task)
        if key is None:  # a plugin cannot sign: keep nothing for this task
            return ShapeCache(len(state))
        cache = caches.get(key)
        if cache is None:
            cache = caches[key] = ShapeCache(len(state))
            if len(caches) > SHAPES_KEPT:
                caches.popitem(last=False)
        caches.move_to_end(key)
        return cache

    def frag_tracker(self, state: ClusterState) -> FragTracker:
        tracker = self._trackers.get(id(state))
        if tracker is None or tracker.state is not state:
            if self._typical_now is None:
                raise ValueError(f"policy {self.policy.name} needs typical tasks")
            tracker = FragTracker(self._typical_now.bind(state), state)
            self._trackers[id(state)] = tracker
        return tracker

    # -- reasons ----------------------------------------------------------------

    def explain(self, state: ClusterState, task: CompiledTask) -> str:
        """One line a user can act on: `no node has 2 H100 free (at most 1 on one node)`.

        Each node is charged to the first filter it fails; each filter words its
        nodes' failure once, for all of them.
        """
        if not len(state):
            return "no node is registered yet"
        fitting = state.fitting_gpus(task)
        remaining = np.ones(len(state), dtype=bool)
        why: Counter[str] = Counter()
        for check in self.policy.filters:
            failed = remaining & ~check.check(state, task, ALL, fitting)
            remaining &= ~failed
            if not failed.any():
                continue
            if check.name == "gpus" and failed.all():
                most = int(row_count(fitting).max()) if fitting.size else 0
                return (
                    f"no node has {task.request.gpu.describe()} free (at most {most} on one node)"
                    + _unusable_gpus(state, task.request.gpu.models)
                )
            for reason, count in check.reason(state, task, np.nonzero(failed)[0]).items():
                why[reason] += count
        if len(state) == 1:
            return f"{state.nodes[0].name}: {next(iter(why))}"
        detail = "; ".join(f"{n} node{'s' if n > 1 else ''}: {w}" for w, n in why.most_common(3))
        return f"no node fits ({detail})"


def _unusable_gpus(state: ClusterState, models: frozenset[str] | None) -> str:
    """`; unusable: node-a GPU 1 (last check FAILed: ...)` for GPUs the task could use."""
    found = [
        f"{node.name} GPU {gpu.index} ({gpu.unusable_reason})"
        for node in state.nodes
        for gpu in node.gpus
        if gpu.unusable_reason and (models is None or gpu.model in models)
    ]
    if not found:
        return ""
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    return "; unusable: " + "; ".join(found[:3]) + more


def reserve(snapshot: Snapshot, placement: Placement) -> None:
    """Record a placement in the snapshot's node views."""
    snapshot.node(placement.node_id).take(
        placement.gpu_uuids, placement.gpu_milli, placement.cpu_milli, placement.memory_mib
    )
