"""Whether a node or a GPU may take new work, decided here only: the scheduler filters
on it and every listing shows it, so the two can never disagree."""

from __future__ import annotations

from dataclasses import dataclass

from gpuprovider.domain.nodes import NodeStatus
from gpuprovider.domain.records import GpuRecord, NodeRecord

NODE_STATUS_REASONS = {
    NodeStatus.CORDONED: "node is cordoned",
    NodeStatus.DRAINING: "node is draining",
    NodeStatus.UNREACHABLE: "node is unreachable",
    NodeStatus.REMOVED: "node was removed",
}


@dataclass(frozen=True)
class Usability:
    """The provider's rules for new work. `proof_max_age_s`: a GPU also needs a passing
    proof of GPU at most that old (`[proof] required`); None: proofs are not required."""

    proof_max_age_s: float | None = None

    def node_reason(self, node: NodeRecord) -> str:
        """Why the node takes no new work; empty when it does."""
        if node.status == NodeStatus.READY:
            return ""
        return node.status_reason or NODE_STATUS_REASONS[node.status]

    def gpu_reason(self, gpu: GpuRecord, now: float) -> str:
        """Why this GPU takes no new work (whatever its node's status); empty when it does."""
        if not gpu.present:
            return "GPU no longer present"
        if gpu.cordon_reason:
            return f"GPU cordoned: {gpu.cordon_reason}"
        if gpu.health != "ok":
            return gpu.health_reason or f"GPU health is {gpu.health}"
        if self.proof_max_age_s is not None:
            if gpu.proof_passed is None:
                return "no proof of GPU yet (proof.required)"
            if not gpu.proof_passed:
                return f"latest proof of GPU failed: {gpu.proof_reason}"
            if now - (gpu.proof_at or 0.0) > self.proof_max_age_s:
                return f"proof of GPU older than {self.proof_max_age_s:g} s (proof.max_age_s)"
        return ""
