"""Whether a node or a GPU may take new work, decided here only: the scheduler filters
on it and every listing shows it, so the two can never disagree."""

from __future__ import annotations

from dataclasses import dataclass, field

from gpuprovider.domain.nodes import NodeStatus
from gpuprovider.domain.records import GpuRecord, NodeRecord

NODE_STATUS_REASONS = {
    NodeStatus.CORDONED: "node is cordoned",
    NodeStatus.DRAINING: "node is draining",
    NodeStatus.UNREACHABLE: "node is unreachable",
    NodeStatus.REMOVED: "node was removed",
}


# A proof must cover at least this much of the GPU's memory to count (and the provider
# refuses smaller challenges: they prove nothing and would hold the GPU for nothing).
MIN_PROOF_COVER = 0.85
# The proof protocol whose verdicts count (`proof.protocol.VERSION`): a verdict given under
# an older one proved weaker parameters and does not count as a new one.
PROOF_PROTOCOL = "gpuprovider-pog-v3"


@dataclass(frozen=True)
class Usability:
    """The provider's rules for new work. `proof_max_age_s`: a GPU also needs a passing
    proof of GPU at most that old (`[proof] required`), signed by one of
    `trusted_verifiers`; None: proofs are not required. `proving`: GPUs a verifier is
    proving right now (kept up to date by the proof service)."""

    proof_max_age_s: float | None = None
    trusted_verifiers: frozenset[str] = frozenset()
    proving: set[str] = field(default_factory=set, compare=False)

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
        if gpu.uuid in self.proving:
            return "being proved (proof of GPU)"
        if self.proof_max_age_s is not None:
            return self.proof_reason(gpu, now)
        return ""

    def proof_reason(self, gpu: GpuRecord, now: float) -> str:
        """Why the GPU's latest verdict does not count as proof; empty when it does."""
        if gpu.proof_passed is None:
            return "no proof of GPU yet (proof.required)"
        if gpu.proof_verifier_key not in self.trusted_verifiers:
            return (
                "latest proof of GPU is not signed by a trusted verifier (proof.trusted_verifiers)"
            )
        if not gpu.proof_passed:
            return f"latest proof of GPU failed: {gpu.proof_reason}"
        if gpu.proof_protocol != PROOF_PROTOCOL:
            shown = gpu.proof_protocol or "an older protocol"
            return f"latest proof of GPU was given under {shown}, not {PROOF_PROTOCOL}: prove again"
        if gpu.proof_model != gpu.model or gpu.proof_simulated != gpu.simulated:
            shown = gpu.proof_model + (" (simulated)" if gpu.proof_simulated else "")
            return f"latest proof of GPU proved a {shown}, not this GPU's model"
        if not (gpu.simulated or gpu.proof_timed):
            return "latest proof of GPU was not timed: it does not show the memory is there"
        memory = gpu.memory_mib * 2**20
        if not gpu.simulated and gpu.proof_covered_bytes < MIN_PROOF_COVER * memory:
            return f"latest proof of GPU covered under {MIN_PROOF_COVER:.0%} of its memory"
        # proof_at is the time the verifier signed, never when the provider stored it
        if self.proof_max_age_s is not None and now - (gpu.proof_at or 0.0) > self.proof_max_age_s:
            return f"proof of GPU older than {self.proof_max_age_s:g} s (proof.max_age_s)"
        return ""
