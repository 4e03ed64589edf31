"""The provider's side of proof of GPU: answer one challenge per GPU, open, record."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gpuprovider.domain.records import GpuRecord
from gpuprovider.inventory.local import torch_index
from gpuprovider.proof import protocol as P
from gpuprovider.proof.protocol import Challenge, ProofError
from gpuprovider.proof.prover import NumpyBackend, Prover, TorchBackend
from gpuprovider.service.errors import Conflict, NotFound, Rejected
from gpuprovider.store.signals import Signal
from gpuprovider.store.store import Store

MIB = 2**20
ANSWER_KEPT_S = 600.0  # openings must come within this long of the commitment


@dataclass
class Answered:
    challenge: Challenge
    prover: Prover
    at: float


class ProofService:
    def __init__(
        self,
        store: Store,
        node_key: Ed25519PrivateKey,
        node_id: str,
        public_key: str,
        simulated_memory_mib: int,
    ):
        self.store, self.key, self.node_id, self.public_key = store, node_key, node_id, public_key
        self.simulated_memory_mib = simulated_memory_mib
        self.proving: set[str] = set()
        self.answered: dict[str, Answered] = {}

    def _gpu(self, uuid: str) -> GpuRecord:
        with self.store.read() as r:
            nodes = r.nodes.list()
        for node in nodes:
            for gpu in node.gpus:
                if gpu.uuid == uuid and gpu.present:
                    if node.id != self.node_id:
                        raise Rejected(f"GPU {uuid} is on node {node.name}; ask that node")
                    return gpu
        raise NotFound(f"no GPU {uuid!r} on this provider; `gpuprovider gpu list` shows them")

    def memory_bytes(self, gpu: GpuRecord) -> int:
        """What a proof of this GPU must fill: the driver's total, or for a simulated GPU
        the host memory it proves with the CPU prover."""
        return (self.simulated_memory_mib if gpu.simulated else gpu.memory_mib) * MIB

    def describe(self, uuid: str) -> dict[str, Any]:
        gpu = self._gpu(uuid)
        return {
            "gpu_uuid": gpu.uuid,
            "model": gpu.model,
            "simulated": gpu.simulated,
            "memory_bytes": self.memory_bytes(gpu),
            "provider_key": self.public_key,
            "proof": self._latest(uuid),
        }

    def _tasks_on(self, uuid: str) -> list[str]:
        with self.store.read() as r:
            return [a.task_id for a in r.tasks.active_allocations() if uuid in a.gpu_uuids]

    def _latest(self, uuid: str) -> dict[str, Any] | None:
        with self.store.read() as r:
            return r.proofs.get(uuid)

    async def answer(self, uuid: str, raw: Any) -> dict[str, Any]:
        """Prove a challenge on one GPU (the daemon keeps serving meanwhile)."""
        gpu = await asyncio.to_thread(self._gpu, uuid)
        try:
            challenge = Challenge.from_dict(raw if isinstance(raw, dict) else {})
        except ProofError as exc:
            raise Rejected(str(exc)) from None
        if challenge.gpu_uuid != uuid:
            raise Rejected(f"the challenge names GPU {challenge.gpu_uuid}, not {uuid}")
        if challenge.provider_key != self.public_key:
            raise Rejected("the challenge names another provider key; fetch this node's key")
        memory = self.memory_bytes(gpu)
        if challenge.params.covered_bytes > memory:
            raise Rejected(
                f"the challenge needs {challenge.params.covered_bytes} bytes of matrices; "
                f"this GPU proves {memory}"
            )
        if challenge.params.steps * challenge.params.per_step > 64 * challenge.params.matrices:
            raise Rejected("the challenge uses each matrix more than 64 times; refused")
        if uuid in self.proving:
            raise Conflict(f"GPU {uuid} is already answering a challenge; one at a time")
        busy = await asyncio.to_thread(self._tasks_on, uuid)
        if busy and not gpu.simulated:
            raise Conflict(f"GPU {uuid} runs tasks {', '.join(busy)}; prove it when idle")
        prover = Prover(challenge, self._backend(gpu))
        self.proving.add(uuid)
        try:
            commitment = await asyncio.to_thread(prover.commit)
        finally:
            self.proving.discard(uuid)
        commitment.signature = self.key.sign(
            P.commitment_digest(challenge.id, commitment.roots)
        ).hex()
        self.answered[uuid] = Answered(challenge, prover, time.monotonic())
        return commitment.to_dict()

    def _backend(self, gpu: GpuRecord):
        if gpu.simulated:
            return NumpyBackend()
        try:
            import torch
        except ImportError:
            raise Rejected(
                "proving a real GPU needs PyTorch: pip install 'gpuprovider[gpu]'"
            ) from None
        index = torch_index(torch, gpu.uuid)
        if index is None:
            raise Rejected(f"PyTorch does not see GPU {gpu.uuid}")
        return TorchBackend(torch, f"cuda:{index}")

    def _pending(self, uuid: str, challenge_id: str) -> Answered:
        entry = self.answered.get(uuid)
        if entry is None or entry.challenge.id != challenge_id:
            raise Conflict(f"GPU {uuid} has no answered challenge {challenge_id!r}")
        if time.monotonic() - entry.at > ANSWER_KEPT_S:
            self.answered.pop(uuid, None)
            raise Conflict(f"challenge {challenge_id} expired; issue a new one")
        return entry

    def open(self, uuid: str, challenge_id: str, wanted: Any) -> bytes:
        entry = self._pending(uuid, challenge_id)
        params = entry.challenge.params
        if not isinstance(wanted, list) or not 1 <= len(wanted) <= params.openings:
            raise Rejected(f"openings: a list of 1 to {params.openings} [step, row, column]")
        triples = []
        for item in wanted:
            if not (
                isinstance(item, list)
                and len(item) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) for v in item)
            ):
                raise Rejected("openings: each must be [step, row, column] integers")
            triples.append(tuple(item))
        try:
            return entry.prover.open(triples)
        except ProofError as exc:
            raise Rejected(str(exc)) from None

    def record(self, uuid: str, body: dict[str, Any], verifier: str) -> None:
        """Store the verifier's verdict for the challenge this GPU last answered."""
        entry = self._pending(uuid, body["challenge_id"])
        self.answered.pop(uuid, None)
        with self.store.tx() as tx:
            tx.proofs.save(
                uuid,
                self.node_id,
                entry.challenge.id,
                body["passed"],
                body["reason"],
                body["figures"],
                verifier,
            )
            tx.signal(Signal.NODES)  # `[proof] required` may now allow the GPU
