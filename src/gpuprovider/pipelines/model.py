"""A pipeline and its stages as two aggregates of the lifecycle kernel: their states,
their tables of allowed transitions, and their records.

A pipeline runs, pauses (a permanent or critical failure, or a person asked), and ends
succeeded, cancelled or aborted. Each of its stages goes through its own table:

```
waiting ──(what it waits for is done)──► ready ──(a pool slot)──► running ──► done
   ▲                                       │  ▲                      │
   │                                       │  └──── retrying ◄───────┤ temporary
   │                                       ├──► held (a timer, a signal) ──► done
   │                                       └──► batching ──(flushed)──► running
   └──────────── resume --from (a person) ─────────── failed ◄────────┘ permanent, critical
```
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Any

from gpuprovider.pipelines.spec import PipelineSpec


class PipelineState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    CANCELLING = "cancelling"  # its stages' tasks are being stopped
    ABORTING = "aborting"  # the same, then its work store is cleaned
    SUCCEEDED = "succeeded"
    CANCELLED = "cancelled"
    ABORTED = "aborted"


P = PipelineState
PIPELINE_TRANSITIONS: dict[PipelineState, frozenset[PipelineState]] = {
    P.RUNNING: frozenset({P.PAUSED, P.SUCCEEDED, P.CANCELLING, P.CANCELLED, P.ABORTING}),
    P.PAUSED: frozenset({P.RUNNING, P.CANCELLING, P.CANCELLED, P.ABORTING}),
    P.CANCELLING: frozenset({P.CANCELLED}),
    P.ABORTING: frozenset({P.ABORTED}),
    P.SUCCEEDED: frozenset(),
    P.CANCELLED: frozenset(),
    P.ABORTED: frozenset(),
}
PIPELINE_TERMINAL = frozenset({P.SUCCEEDED, P.CANCELLED, P.ABORTED})
PIPELINE_LIVE = frozenset(P) - PIPELINE_TERMINAL


class StageState(StrEnum):
    WAITING = "waiting"  # for the stages it comes after
    READY = "ready"  # for a pool slot, or for its pipeline to run
    HELD = "held"  # a wait stage: for its timer or its signal
    BATCHING = "batching"  # for its batch to be flushed
    RUNNING = "running"  # its task is live (queued for a node, or running)
    RETRYING = "retrying"  # failed for now: ready again at due_at
    DONE = "done"
    FAILED = "failed"  # permanent or critical: its pipeline is paused
    CANCELLED = "cancelled"


St = StageState
STAGE_TRANSITIONS: dict[StageState, frozenset[StageState]] = {
    St.WAITING: frozenset({St.READY, St.HELD, St.BATCHING, St.CANCELLED}),
    St.READY: frozenset({St.RUNNING, St.WAITING, St.CANCELLED}),
    St.HELD: frozenset({St.DONE, St.WAITING, St.CANCELLED}),
    St.BATCHING: frozenset({St.RUNNING, St.WAITING, St.CANCELLED}),
    # running -> ready: its task was stopped by a pause, to run again on resume
    St.RUNNING: frozenset({St.DONE, St.RETRYING, St.FAILED, St.READY, St.CANCELLED}),
    St.RETRYING: frozenset({St.READY, St.WAITING, St.CANCELLED}),
    St.DONE: frozenset({St.WAITING}),  # resume --from an earlier stage runs it again
    St.FAILED: frozenset({St.WAITING, St.CANCELLED}),
    St.CANCELLED: frozenset(),
}
# Stages whose task may be live: they hold a pool slot.
STAGE_HOLDS_SLOT = frozenset({St.RUNNING})
STAGE_SETTLED = frozenset({St.DONE, St.CANCELLED})


@dataclass
class PipelineRecord:
    id: str
    name: str | None
    tenant: str
    state: PipelineState
    state_reason: str
    spec: dict[str, Any]
    work_store: str | None  # this pipeline's own folder, when its spec asked for a store
    node_id: str | None  # where its stages run, once its first one was placed (a store)
    cleanup_task_id: str | None
    created_at: float
    updated_at: float
    finished_at: float | None
    version: int

    @cached_property
    def pipeline_spec(self) -> PipelineSpec:
        """The spec as a model, validated once per pipeline in the process (a spec never
        changes once stored; every stage's transition reads it)."""
        found = _SPECS.get(self.id)
        if found is None:
            found = PipelineSpec.model_validate(self.spec)
            with _SPECS_LOCK:
                if len(_SPECS) >= SPECS_KEPT:  # forget the oldest half
                    for stale in list(_SPECS)[: SPECS_KEPT // 2]:
                        del _SPECS[stale]
                _SPECS[self.id] = found
        return found


SPECS_KEPT = 4096
_SPECS: dict[str, PipelineSpec] = {}
_SPECS_LOCK = threading.Lock()


@dataclass
class StageRecord:
    id: str
    pipeline_id: str
    tenant: str
    name: str
    pool: str
    depth: int
    state: StageState
    state_reason: str
    task_id: str | None
    attempts: int  # runs that failed for the stage's own fault, since it last succeeded
    level: str  # the level of its last failure ("" when none)
    due_at: float | None  # retrying, a timer, a batch's deadline: when it moves on
    started_at: float | None
    finished_at: float | None
    updated_at: float
    version: int
