"""The provider's side of proof of GPU: one verifier's session per GPU at a time (fill,
walk, open), and the verdicts of trusted verifiers only."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from dataclasses import dataclass
from typing import Any

import pynvml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gpuprovider.domain.records import GpuRecord
from gpuprovider.domain.usability import MIN_PROOF_COVER
from gpuprovider.inventory.local import torch_index
from gpuprovider.proof import attestation, gpu_kernels
from gpuprovider.proof import protocol as P
from gpuprovider.proof.protocol import Challenge, ProofError
from gpuprovider.proof.prover import NumpyBackend, Prover
from gpuprovider.proof.verifier import check_signed_verdict
from gpuprovider.service.errors import Conflict, Forbidden, NotFound, Rejected
from gpuprovider.store.signals import Signal
from gpuprovider.store.store import Store

log = logging.getLogger(__name__)

MIB = 2**20
BUSY = ("filling", "walking")  # stages a session cannot expire in
CLOCK_SKEW_S = 300.0  # a verdict dated further ahead than this is refused


@dataclass
class Session:
    challenge: Challenge
    prover: Prover
    verifier: str  # the token's name: only it may go on with the session
    expires: float
    stage: str = "filling"  # filling, filled, walking, walked
    commitment: bytes = b""  # the signed commitment's digest, once walked


def _read_attestation(index: int, nonce: bytes) -> tuple[bytes, bytes]:
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # no driver, no NVML: no CC either
        raise attestation.NotAvailable(f"NVML is unavailable ({exc})") from None
    try:
        return attestation.read(pynvml, index, nonce)
    finally:
        pynvml.nvmlShutdown()


class ProofService:
    def __init__(
        self,
        store: Store,
        node_key: Ed25519PrivateKey,
        node_id: str,
        public_key: str,
        simulated_memory_mib: int,
        trusted_verifiers: frozenset[str],
        proving: set[str],
        session_s: float,
    ):
        self.store, self.key, self.node_id, self.public_key = store, node_key, node_id, public_key
        self.simulated_memory_mib = simulated_memory_mib
        self.trusted = trusted_verifiers
        self.proving = proving  # GPUs in a session: the scheduler gives them no new work
        self.session_s = session_s  # after the fill: walk, open and verdict within this
        self.sessions: dict[str, Session] = {}

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
        """What this GPU can fill: the driver's total, or for a simulated GPU the host
        memory it proves with the CPU prover."""
        return (self.simulated_memory_mib if gpu.simulated else gpu.memory_mib) * MIB

    def describe(self, uuid: str) -> dict[str, Any]:
        """What the provider says about the GPU. A verifier takes the model and whether
        it is simulated from here, never the memory size or the key."""
        gpu = self._gpu(uuid)
        return {
            "gpu_uuid": gpu.uuid,
            "model": gpu.model,
            "simulated": gpu.simulated,
            "memory_bytes": self.memory_bytes(gpu),
            "provider_key": self.public_key,
            "proof": self._latest(uuid),
        }

    def _latest(self, uuid: str) -> dict[str, Any] | None:
        with self.store.read() as r:
            return r.proofs.get(uuid)

    def _tasks_on(self, uuid: str) -> list[str]:
        with self.store.read() as r:
            return [a.task_id for a in r.tasks.active_allocations() if uuid in a.gpu_uuids]

    # -- sessions -----------------------------------------------------------------------

    def _end(self, uuid: str, session: Session) -> None:
        """Forget a session and free what it held (memory, the GPU for new work)."""
        if self.sessions.get(uuid) is session:
            del self.sessions[uuid]
            self.proving.discard(uuid)
            session.prover.release()
            session.prover.states = []
            with self.store.tx() as tx:
                tx.signal(Signal.NODES)  # the scheduler may use the GPU again

    @staticmethod
    def _expired(session: Session) -> bool:
        return session.stage not in BUSY and time.monotonic() > session.expires

    def _arm(self, uuid: str, session: Session) -> None:
        """End the session when it expires, whether or not anyone calls again."""
        wait = max(0.5, session.expires - time.monotonic())
        asyncio.get_running_loop().call_later(wait, self._expire, uuid, session)

    def _expire(self, uuid: str, session: Session) -> None:
        if self.sessions.get(uuid) is not session:
            return
        if not self._expired(session):
            self._arm(uuid, session)
            return
        log.info("proof session %s on GPU %s expired", session.challenge.id, uuid)
        self._end(uuid, session)

    def _sweep(self) -> None:
        for uuid, session in list(self.sessions.items()):
            if self._expired(session):
                self._end(uuid, session)

    def _session(self, uuid: str, challenge_id: str, verifier: str, stage: str) -> Session:
        self._sweep()
        session = self.sessions.get(uuid)
        if session is None or session.challenge.id != challenge_id:
            raise Conflict(f"GPU {uuid} has no open challenge {challenge_id!r}")
        if session.verifier != verifier:
            raise Forbidden(f"challenge {challenge_id} belongs to another verifier")
        if session.stage != stage:
            raise Conflict(f"challenge {challenge_id} is {session.stage}; this needs {stage}")
        return session

    def _check_challenge(self, gpu: GpuRecord, raw: Any) -> Challenge:
        try:
            challenge = Challenge.from_dict(raw)
        except ProofError as exc:
            raise Rejected(str(exc)) from None
        if challenge.gpu_uuid != gpu.uuid:
            raise Rejected(f"the challenge names GPU {challenge.gpu_uuid}, not {gpu.uuid}")
        if challenge.provider_key != self.public_key:
            raise Rejected("the challenge names another provider key; pin this node's key")
        if challenge.model != gpu.model:
            raise Rejected(f"the challenge proves a {challenge.model}; this GPU is a {gpu.model}")
        memory, covered = self.memory_bytes(gpu), challenge.params.covered_bytes
        if covered > memory:
            raise Rejected(
                f"the challenge needs {covered} bytes of matrices; this GPU has {memory}"
            )
        if covered < MIN_PROOF_COVER * memory:
            raise Rejected(
                f"the challenge covers {covered} bytes, under {MIN_PROOF_COVER:.0%} of this "
                f"GPU's {memory}: a proof of part of the memory proves nothing"
            )
        return challenge

    async def prepare(self, uuid: str, raw: Any, verifier: str) -> dict[str, Any]:
        """Take a challenge and fill memory with its matrices (untimed). The GPU is the
        verifier's until its session ends: no other challenge, no new work."""
        gpu = await asyncio.to_thread(self._gpu, uuid)
        challenge = self._check_challenge(gpu, raw)
        self._sweep()
        if uuid in self.sessions:
            other = self.sessions[uuid]
            left = max(0.0, other.expires - time.monotonic())
            raise Conflict(
                f"GPU {uuid} is being proved (challenge {other.challenge.id}) for up to "
                f"{left:.0f} s more; one challenge per GPU at a time"
            )
        busy = await asyncio.to_thread(self._tasks_on, uuid)
        if busy:
            raise Conflict(f"GPU {uuid} runs tasks {', '.join(busy)}; prove it when idle")
        if uuid in self.sessions:  # opened by a concurrent request meanwhile
            raise Conflict(f"GPU {uuid} is being proved; one challenge per GPU at a time")
        # a challenge id opens one session, ever: a verdict already given for it (say, one
        # that expired) can then never be posted again under a new session
        if not await asyncio.to_thread(self._take, challenge.id, uuid):
            raise Conflict(
                f"challenge {challenge.id} was used before; a verifier sends a fresh id "
                "for every proof"
            )
        session = Session(
            challenge,
            Prover(challenge, self._backend(gpu)),
            verifier,
            time.monotonic() + self.session_s,
        )
        self.sessions[uuid] = session
        self.proving.add(uuid)
        self._arm(uuid, session)
        try:
            fill_s = await asyncio.to_thread(session.prover.fill)
        except BaseException:
            self._end(uuid, session)
            raise
        session.stage, session.expires = "filled", time.monotonic() + self.session_s
        return {"challenge_id": challenge.id, "fill_s": round(fill_s, 3)}

    async def walk(self, uuid: str, challenge_id: str, nonce: str, verifier: str) -> dict:
        """The timed part: walk from the nonce, commit, sign; the matrices are freed."""
        session = self._session(uuid, challenge_id, verifier, "filled")
        try:
            P.check_hex(nonce, 32, "nonce")
        except ProofError as exc:
            raise Rejected(str(exc)) from None
        session.stage = "walking"
        try:
            commitment = await asyncio.to_thread(session.prover.walk, nonce)
        except BaseException:
            self._end(uuid, session)
            raise
        session.prover.release()
        session.stage = "walked"
        session.commitment = P.commitment_digest(challenge_id, nonce, commitment.roots)
        commitment.signature = self.key.sign(session.commitment).hex()
        return commitment.to_dict()

    async def attest(self, uuid: str, challenge_id: str, nonce: str, verifier: str) -> dict:
        """The GPU's confidential-computing attestation report for this proof (after the
        walk): NVML's report and certificate chain, for the nonce derived from the walk's
        commitment (no other nonce: the GPU signs nothing but this proof)."""
        session = self._session(uuid, challenge_id, verifier, "walked")
        if nonce != attestation.nonce_for(challenge_id, session.commitment).hex():
            raise Rejected("the attestation nonce is not this proof's (attestation.nonce_for)")
        gpu = await asyncio.to_thread(self._gpu, uuid)
        if gpu.simulated:
            raise Conflict("a simulated GPU has no hardware to attest")
        try:
            report, chain = await asyncio.to_thread(
                _read_attestation, gpu.idx, bytes.fromhex(nonce)
            )
        except attestation.NotAvailable as exc:
            raise Conflict(f"GPU {uuid} offers no attestation: {exc}") from None
        return {
            "report": base64.b64encode(report).decode(),
            "cert_chain": base64.b64encode(chain).decode(),
        }

    def _take(self, challenge_id: str, uuid: str) -> bool:
        with self.store.tx() as tx:
            return tx.proofs.take_challenge(challenge_id, uuid)

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
        return gpu_kernels.cuda_backend(torch, f"cuda:{index}")

    def open(self, uuid: str, challenge_id: str, wanted: Any, verifier: str) -> bytes:
        session = self._session(uuid, challenge_id, verifier, "walked")
        params = session.challenge.params
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
            return session.prover.open(triples)
        except ProofError as exc:
            raise Rejected(str(exc)) from None

    def record(self, uuid: str, signed: Any, verifier: str) -> dict[str, Any]:
        """Store a verdict a trusted verifier signed for this GPU's open challenge."""
        gpu = self._gpu(uuid)
        try:
            verdict = check_signed_verdict(signed, self.trusted)
        except ProofError as exc:
            raise Forbidden(str(exc)) from None
        session = self._session(uuid, str(verdict["challenge_id"]), verifier, "walked")
        challenge = session.challenge
        expected = {
            "gpu_uuid": uuid,
            "provider_key": self.public_key,
            "model": gpu.model,
            "simulated": gpu.simulated,
            "covered_bytes": challenge.params.covered_bytes,
        }
        for name, value in expected.items():
            if verdict[name] != value:
                raise Rejected(f"the verdict's {name} is {verdict[name]!r}; expected {value!r}")
        if verdict["protocol"] != P.VERSION:
            raise Rejected(
                f"the verdict was given under {verdict['protocol']!r}; this provider counts "
                f"{P.VERSION} only"
            )
        at = verdict["at"]
        number = isinstance(at, int | float) and not isinstance(at, bool)
        if not number or at > time.time() + CLOCK_SKEW_S:
            raise Rejected(
                f"the verdict's time {at!r} is not a time up to {CLOCK_SKEW_S:g} s from now: "
                "a proof's age starts when its verifier signed it"
            )
        with self.store.tx() as tx:
            tx.proofs.save(uuid, self.node_id, verdict, signed["signature"], verifier)
            tx.signal(Signal.NODES)  # `[proof] required` may now allow the GPU
        self._end(uuid, session)
        return verdict
