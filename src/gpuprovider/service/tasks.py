"""Task operations behind the API: submit, dry-run, cancel, read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from gpuprovider.backends.container import container_engine
from gpuprovider.domain.spec import TaskSpec
from gpuprovider.domain.states import TERMINAL, TaskState
from gpuprovider.scheduler import Framework, Placement
from gpuprovider.service.errors import Conflict, NotFound, Rejected
from gpuprovider.service.gangs import release_gang
from gpuprovider.service.placement import build_snapshot, task_request
from gpuprovider.store.records import TaskRecord
from gpuprovider.store.store import NameTaken, StaleTask, Store


class TaskService:
    def __init__(
        self,
        store: Store,
        framework: Framework,
        on_submitted: Callable[[str], None] = lambda task_id: None,
        on_cancel_requested: Callable[[], None] = lambda: None,
        on_capacity_freed: Callable[[], None] = lambda: None,
        engine_probe: Callable[[], str | None] = container_engine,
        proof_max_age_s: float | None = None,
    ):
        self.store = store
        self.framework = framework
        self.on_submitted = on_submitted
        self.on_cancel_requested = on_cancel_requested
        self.on_capacity_freed = on_capacity_freed
        self.engine_probe = engine_probe
        self.proof_max_age_s = proof_max_age_s

    def _check_runnable(self, spec: TaskSpec) -> None:
        if spec.image and self.engine_probe() is None:
            raise Rejected(
                "image: no container engine (docker or podman) answers on this machine; "
                "install and start one, or give a command instead of an image"
            )

    def submit(self, spec: TaskSpec, tenant: str) -> TaskRecord:
        self._check_runnable(spec)
        if spec.gang:
            self._check_gang(spec, tenant)
        try:
            task = self.store.submit(spec, tenant)
        except NameTaken as exc:
            raise Conflict(str(exc)) from None
        self.on_submitted(task.id)
        return task

    def _check_gang(self, spec: TaskSpec, tenant: str) -> None:
        assert spec.gang is not None
        live = [
            t
            for t in self.store.gang_members(f"{tenant}/{spec.gang.name}")
            if t.state not in TERMINAL
        ]
        sizes = {t.task_spec.gang.size for t in live if t.task_spec.gang}
        if sizes and spec.gang.size not in sizes:
            raise Conflict(
                f"gang.size: gang {spec.gang.name!r} already has members of size "
                f"{sizes.pop()}; this task says {spec.gang.size}"
            )
        if len(live) >= spec.gang.size:
            raise Conflict(f"gang {spec.gang.name!r} already has its {spec.gang.size} live members")

    def dry_run(self, spec: TaskSpec) -> dict[str, Any]:
        """What would happen to `spec` now, storing nothing."""
        self._check_runnable(spec)
        if spec.name and (holder := self.store.task(spec.name)) and holder.state not in TERMINAL:
            raise Conflict(f"a live task is already named {spec.name!r} ({holder.id})")
        nodes = self.store.nodes()
        request = task_request("dry-run", spec)
        now = self.framework.place_one(
            build_snapshot(
                nodes, self.store.active_allocations(), proof_max_age_s=self.proof_max_age_s
            ),
            request,
        )
        if isinstance(now, Placement):
            return {"placeable_now": True, "would_wait": False, "placement": asdict(now)}
        ever = self.framework.place_one(
            build_snapshot(nodes, [], idle=True, proof_max_age_s=self.proof_max_age_s), request
        )
        verdict = {"placeable_now": False, "reason": now.reason}
        if isinstance(ever, Placement):
            verdict["would_wait"] = True
            verdict["message"] = f"would stay queued until resources free up: {now.reason}"
        else:
            verdict["would_wait"] = False
            verdict["message"] = (
                f"would stay queued: no node could run it even when idle ({ever.reason})"
            )
        return verdict

    def get(self, ref: str) -> TaskRecord:
        task = self.store.task(ref)
        if task is None:
            raise NotFound(f"no task with id or name {ref!r}")
        return task

    def cancel(self, ref: str, by: str) -> TaskRecord:
        for _ in range(5):
            task = self.get(ref)
            if task.state in TERMINAL:
                raise Conflict(f"task {task.label} already {task.state}; nothing to cancel")
            if task.state == TaskState.CANCELLING:
                return task
            try:
                with self.store.tx() as tx:
                    tx.transition(task, TaskState.CANCELLING, f"cancel requested by {by}")
                    if task.pid is None:  # no process to stop: done at once
                        tx.release(task.id)
                        tx.transition(task, TaskState.CANCELLED, f"cancelled by {by} before it ran")
                        release_gang(
                            self.store, tx, task, f"gang member {task.label} was cancelled"
                        )
            except StaleTask:
                continue  # changed under us: read again and decide again
            if task.state == TaskState.CANCELLED:
                self.on_capacity_freed()
            else:
                self.on_cancel_requested()
            return task
        raise Conflict(f"task {ref} keeps changing; try the cancel again")
