"""Per-tenant GPU quotas (DLWS style): work within a tenant's quota is guaranteed;
work beyond it runs only as preemptible, below every guaranteed task."""

from __future__ import annotations

from gpuprovider.config import QuotaConfig
from gpuprovider.domain.records import AllocationRecord, TaskRecord
from gpuprovider.domain.spec import TaskSpec
from gpuprovider.domain.states import TaskState
from gpuprovider.scheduler import RunningTask

S = TaskState

# Work beyond its tenant's quota ranks below every guaranteed task.
OVER_QUOTA_PENALTY = 10_000


def effective_priority(priority: int, over_quota: bool) -> int:
    return priority - OVER_QUOTA_PENALTY if over_quota else priority


class QuotaBook:
    """GPUs each tenant holds, against its quota (none configured: no limit)."""

    def __init__(
        self,
        quotas: dict[str, QuotaConfig],
        allocations: list[AllocationRecord],
        holders: dict[str, TaskRecord],
    ):
        self.limit_milli = {tenant: int(q.gpus * 1000) for tenant, q in quotas.items()}
        self.used_milli: dict[str, int] = {}
        for alloc in allocations:
            holder = holders.get(alloc.task_id)
            if holder is not None and not alloc.over_quota:
                self.used_milli[holder.tenant] = self.used_milli.get(
                    holder.tenant, 0
                ) + alloc.gpu_milli * len(alloc.gpu_uuids)

    def admit(self, tenant: str, spec: TaskSpec) -> bool:
        """Count the task against its tenant; True if that takes the tenant over quota."""
        limit = self.limit_milli.get(tenant)
        gpu = spec.gpu
        want = gpu.milli_per_gpu * gpu.gpus_touched if gpu.wants_gpu else 0
        if limit is None or want == 0:
            return False
        used = self.used_milli.get(tenant, 0)
        if used + want > limit:
            return True
        self.used_milli[tenant] = used + want
        return False


def running_work(
    allocations: list[AllocationRecord], holders: dict[str, TaskRecord]
) -> list[RunningTask]:
    """Running tasks as preemption candidates: preemptible if their spec says so or
    they run beyond their tenant's quota."""
    work = []
    for alloc in allocations:
        holder = holders.get(alloc.task_id)
        if holder is None or holder.state != S.RUNNING:
            continue
        spec = holder.task_spec
        work.append(
            RunningTask(
                task_id=holder.id,
                node_id=alloc.node_id,
                gpu_uuids=tuple(alloc.gpu_uuids),
                gpu_milli=alloc.gpu_milli,
                cpu_milli=alloc.cpu_milli,
                memory_mib=alloc.memory_mib,
                priority=effective_priority(holder.priority, alloc.over_quota),
                preemptible=spec.preemptible or alloc.over_quota,
                started_at=holder.started_at or 0.0,
                gang=holder.gang,
            )
        )
    return work
