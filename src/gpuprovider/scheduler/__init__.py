"""Placement library: snapshot in, decisions out, no I/O."""

from gpuprovider.scheduler.framework import Framework, Policy
from gpuprovider.scheduler.model import (
    Decision,
    GpuView,
    NodeView,
    Placement,
    Preemption,
    RunningTask,
    Snapshot,
    TaskRequest,
    Unplaced,
)
from gpuprovider.scheduler.plugins import POLICIES, policy

__all__ = [
    "POLICIES",
    "Decision",
    "Framework",
    "GpuView",
    "NodeView",
    "Placement",
    "Policy",
    "Preemption",
    "RunningTask",
    "Snapshot",
    "TaskRequest",
    "Unplaced",
    "policy",
]
