"""The prover: fill memory with the challenge's matrices, run the chain, commit, open.

Two backends compute the same bits: numpy on any machine (float64 BLAS is exact for
these int8 products), and PyTorch with `torch._int_mm` on a CUDA GPU.
"""

from __future__ import annotations

import base64
import binascii
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gpuprovider.proof import protocol as P
from gpuprovider.proof.protocol import Challenge, Params, ProofError

GENERATE_CHUNK = 64  # matrices generated per pass (bounds temporary memory)


class NumpyBackend:
    name = "numpy"

    def __init__(self) -> None:
        self.big: np.ndarray | None = None

    def allocate(self, params: Params) -> None:
        self.big = np.empty((params.matrices, params.n, params.n), dtype=np.int8)

    def generate(self, k0: int, keys: np.ndarray, n: int, start: int, stop: int) -> None:
        self.big[start:stop] = self.make(k0, keys[start:stop], n)

    def make(self, k0: int, keys: np.ndarray, n: int) -> np.ndarray:
        made = P.words(P.table(np, k0, n)[None, :], keys[:, None])
        cols = P.bytes_to_int8(np, made.reshape(len(keys), n, n // 4), n)  # [j, col, row]
        return cols.transpose(0, 2, 1).astype(np.int8)

    def first_state(self, k0: int, key: int, params: Params) -> np.ndarray:
        return self.make(k0, np.array([key]), params.n)[0, : params.m].copy()

    def matrices(self, js: np.ndarray) -> np.ndarray:
        return self.big[js]

    def step(self, state: np.ndarray, mats: np.ndarray, params: Params) -> np.ndarray:
        n, m, w = params.n, params.m, params.per_step
        wide = mats.transpose(1, 0, 2).reshape(n, w * n)  # [M_j1 | ... | M_jw]
        products = (state.astype(np.float64) @ wide.astype(np.float64)).astype(np.int64)
        low = (products & 0xFF).reshape(m, w, n)
        y = np.bitwise_xor.reduce(low, axis=1)  # [m, n]
        return (y.T.reshape(m, n) - 128).astype(np.int8)

    def to_host(self, state) -> np.ndarray:
        return state

    def release(self) -> None:
        self.big = None


class TorchBackend(NumpyBackend):
    """The same computation on a CUDA GPU (or, for tests of bit-identity, on the CPU)."""

    name = "torch"

    def __init__(self, torch, device: str = "cuda") -> None:
        super().__init__()
        self.torch, self.device = torch, torch.device(device)

    def allocate(self, params: Params) -> None:
        torch = self.torch
        self.big = torch.empty(
            (params.matrices, params.n, params.n), dtype=torch.int8, device=self.device
        )
        self._table = None

    def make(self, k0: int, keys: np.ndarray, n: int):
        torch = self.torch
        if getattr(self, "_table", None) is None or self._table[0] != (k0, n):
            self._table = ((k0, n), P.table(torch, k0, n, like=self.device))
        tab = self._table[1]
        key = torch.as_tensor(keys, dtype=torch.int64, device=self.device)
        made = P.words(tab[None, :], key[:, None])
        cols = P.bytes_to_int8(torch, made.reshape(len(keys), n, n // 4), n)
        return cols.transpose(1, 2).to(torch.int8)

    def generate(self, k0: int, keys: np.ndarray, n: int, start: int, stop: int) -> None:
        self.big[start:stop] = self.make(k0, keys[start:stop], n)

    def first_state(self, k0: int, key: int, params: Params):
        return self.make(k0, np.array([key]), params.n)[0, : params.m].contiguous()

    def matrices(self, js: np.ndarray):
        return self.big[self.torch.as_tensor(js, device=self.device)]

    def step(self, state, mats, params: Params):
        torch = self.torch
        n, m, w = params.n, params.m, params.per_step
        wide = mats.permute(1, 0, 2).reshape(n, w * n)
        if self.device.type == "cuda":
            products = torch._int_mm(state, wide)
        else:  # CPU: exact through int32 matmul, for bit-identity tests
            products = state.to(torch.int32) @ wide.to(torch.int32)
        low = (products & 0xFF).reshape(m, w, n)
        y = low[:, 0]
        for k in range(1, w):
            y = torch.bitwise_xor(y, low[:, k])
        return (y.T.reshape(m, n) - 128).to(torch.int8)

    def to_host(self, state) -> np.ndarray:
        return state.cpu().numpy()

    def release(self) -> None:
        self.big = None
        self._table = None
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()


def pick_backend(device: str | None = None):
    """PyTorch on CUDA when a GPU is there (device "cuda:N"), else numpy."""
    if device and device.startswith("cuda"):
        import torch

        return TorchBackend(torch, device)
    return NumpyBackend()


@dataclass
class Commitment:
    challenge_id: str
    roots: bytes  # 32 bytes per state, X_0 .. X_L
    signature: str = ""  # hex Ed25519 over commitment_digest, by the provider's node key
    prover_s: float = 0.0  # the prover's own timing (informative; the verifier times itself)
    backend: str = ""

    def to_dict(self) -> dict:
        return {
            "challenge_id": self.challenge_id,
            "roots": base64.b64encode(self.roots).decode(),
            "signature": self.signature,
            "prover_s": self.prover_s,
            "backend": self.backend,
        }

    @classmethod
    def from_dict(cls, raw: dict, params: Params) -> Commitment:
        try:
            roots = base64.b64decode(raw["roots"], validate=True)
            made = cls(
                str(raw["challenge_id"]),
                roots,
                str(raw.get("signature", "")),
                float(raw.get("prover_s", 0.0)),
                str(raw.get("backend", "")),
            )
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise ProofError(f"malformed commitment: {exc}") from None
        if len(roots) != 32 * (params.steps + 1):
            raise ProofError(
                f"commitment has {len(roots) // 32} state roots; the challenge needs "
                f"{params.steps + 1}"
            )
        return made

    def root(self, state: int) -> bytes:
        return self.roots[32 * state : 32 * state + 32]


@dataclass
class Prover:
    """Proves one challenge; keeps the states (m x n bytes each) to answer openings."""

    challenge: Challenge
    backend: NumpyBackend = field(default_factory=NumpyBackend)
    states: list[np.ndarray] = field(default_factory=list)
    levels: dict[int, list[list[bytes]]] = field(default_factory=dict)
    on_progress: Callable[[str, float], None] = lambda _what, _fraction: None

    def commit(self) -> Commitment:
        params = self.challenge.params
        t0 = time.perf_counter()
        k0, keys = self.challenge.keys()
        self.backend.allocate(params)
        for start in range(0, params.matrices, GENERATE_CHUNK):
            stop = min(params.matrices, start + GENERATE_CHUNK)
            self.backend.generate(k0, keys, params.n, start, stop)
            self.on_progress("filling memory", stop / params.matrices)
        state = self.backend.first_state(k0, int(keys[-1]), params)
        self.states = [self.backend.to_host(state)]
        hasher = _BackgroundRoots(self)
        index_root = self._root(0)
        for step in range(1, params.steps + 1):
            start = P.epoch_start(step, params)
            if start == step - 1 and step > 1:
                index_root = self._root(start)
            js = P.indices(index_root, step, params)
            state = self.step(state, js)
            self.states.append(self.backend.to_host(state))
            hasher.offer(step)
            if step % 64 == 0 or step == params.steps:
                self.on_progress("running the chain", step / params.steps)
        hasher.finish()
        self.backend.release()
        roots = b"".join(self._root(i) for i in range(params.steps + 1))
        return Commitment(
            self.challenge.id, roots, prover_s=time.perf_counter() - t0, backend=self.backend.name
        )

    def step(self, state, js: np.ndarray):
        """One chain step; a test subclass overrides this to cheat."""
        return self.backend.step(state, self.backend.matrices(js), self.challenge.params)

    def _root(self, state: int) -> bytes:
        if state not in self.levels:
            self.levels[state] = P.merkle_levels(state, self.states[state])
        return self.levels[state][-1][0]

    def open(self, wanted: list[tuple[int, int, int]]) -> bytes:
        """The rows and paths for each opening (step, r, c), in order, as bytes."""
        params = self.challenge.params
        out = bytearray()
        for step, r, c in wanted:
            if not (1 <= step <= params.steps and 0 <= r < params.m and 0 <= c < params.n):
                raise ProofError(f"opening ({step}, {r}, {c}) is outside the challenge")
            prev_row, row, _col = P.opened_rows(params, step, r, c)
            for state, index in ((step - 1, prev_row), (step, row)):
                out += self.row_bytes(state, index)
                self._root(state)
                out += b"".join(P.merkle_path(self.levels[state], index))
        return bytes(out)

    def row_bytes(self, state: int, row: int) -> bytes:
        return self.states[state][row].tobytes()


class _BackgroundRoots:
    """Hashes finished states while the chain runs (the roots not on the critical path)."""

    def __init__(self, prover: Prover):
        self.prover = prover
        self.states: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def offer(self, state: int) -> None:
        self.states.put(state)

    def _run(self) -> None:
        while (state := self.states.get()) is not None:
            self.prover._root(state)

    def finish(self) -> None:
        self.states.put(None)
        self.thread.join()
