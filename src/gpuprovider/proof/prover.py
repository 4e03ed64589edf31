"""The prover: fill memory with the challenge's matrices, walk, commit, open.

Two backends compute the same bits: numpy on any machine (float32 BLAS is exact for
these int8 products while n <= 1024, float64 beyond), and PyTorch on a CUDA GPU.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpuprovider.proof import native
from gpuprovider.proof import protocol as P
from gpuprovider.proof.protocol import Challenge, Params, ProofError

GENERATE_CHUNK = 16  # matrices made per pass (bounds temporary memory)
GATHER_BYTES = 64 << 20  # matrices gathered per chunk of rows in the numpy walk


def exact_float(n: int):
    """A float type whose sums of n int8 products are exact integers."""
    return np.float32 if n <= 1024 else np.float64


class NumpyBackend:
    """The CPU prover. Matrices are kept in generation order (each transposed, Mt[j][c][l]:
    one contiguous run per column), so the fill writes words where they are made and the
    walk streams each matrix once. The native kernel (`_native.c`) walks at the memory's
    speed, one byte read per byte proven; without it, numpy's float BLAS computes the
    same bits (exact while n <= 1024), moving ~11 bytes per byte."""

    def __init__(self) -> None:
        # np.ndarray here, a torch tensor in TorchBackend; None once released
        self.big: Any = None

    @property
    def name(self) -> str:
        return native.kernel()

    def allocate(self, params: Params) -> None:
        self.params = params
        self.big = np.empty((params.matrices, params.n, params.n), dtype=np.int8)

    def fill(self, k0: int, keys: np.ndarray, start: int, stop: int) -> None:
        n = self.params.n
        words = self.big[start:stop].view(np.uint32).reshape(stop - start, n * n // 4)
        fast = native.module()
        if fast is not None:  # made where they are kept: no copy
            fast.matrix_words(
                words, np.ascontiguousarray(keys[start:stop], np.uint32), k0, n, self.params.rounds
            )
            P.words_to_transposed(words, n)
        else:
            self.big[start:stop] = P.make_transposed(k0, keys[start:stop], n, self.params.rounds)

    def gather(self, js: np.ndarray) -> np.ndarray:
        """The matrices `js` (a flat index list), (len(js), n, n) int8 Mt; a cheating
        backend overrides this to make the ones it did not keep."""
        return self.big[js]

    def from_host(self, state: np.ndarray):
        return state

    def to_host(self, state) -> np.ndarray:
        return state

    def step(self, state: np.ndarray, js: np.ndarray) -> np.ndarray:
        fast = native.module()
        if fast is not None and type(self).gather is NumpyBackend.gather:
            p = self.params
            out = np.empty((p.m, p.n), dtype=np.int8)
            fast.walk_step(
                out, state, self.big, np.ascontiguousarray(js, np.int64), p.m, p.n, 0, p.m
            )
            return out
        return self.numpy_step(state, js)

    def numpy_step(self, state: np.ndarray, js: np.ndarray) -> np.ndarray:
        p = self.params
        m, w, n = p.m, p.per_step, p.n
        ftype = exact_float(n)
        y = np.empty((m, n), dtype=np.int64)
        rows = max(1, GATHER_BYTES // (w * n * n * 4))
        for lo in range(0, m, rows):
            hi = min(m, lo + rows)
            mats = self.gather(js[lo:hi].reshape(-1)).reshape(hi - lo, w, n, n).astype(ftype)
            vec = state[lo:hi].astype(ftype)[:, None, :, None]  # [r, 1, l, 1]
            products = np.matmul(mats, vec)[..., 0].astype(np.int64)  # [r, w, c]
            y[lo:hi] = np.bitwise_xor.reduce(products & 0xFF, axis=1)
        return (y.T.reshape(m, n) - 128).astype(np.int8)

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
        self.params = params
        self.big = torch.empty(
            (params.matrices, params.n, params.n), dtype=torch.int8, device=self.device
        )
        self._table: Any = None  # a torch tensor, made on the first fill

    def fill(self, k0: int, keys: np.ndarray, start: int, stop: int) -> None:
        if self._table is None:
            self._table = P.table(self.torch, k0, self.params.n, like=self.device)
        self.big[start:stop] = self.make(keys[start:stop])

    def make(self, keys: np.ndarray):
        """Whole matrices for `keys` on the device, (len(keys), n, n) int8."""
        torch, n = self.torch, self.params.n
        key = torch.as_tensor(keys, dtype=torch.int64, device=self.device)
        made = P.words(self._table[None, :], key[:, None], self.params.rounds)
        cols = P.bytes_to_int8(torch, made.reshape(len(keys), n, n // 4), n)
        return cols.transpose(1, 2).to(torch.int8)

    def gather(self, js: np.ndarray):
        return self.big[self.torch.as_tensor(js, device=self.device)]

    def from_host(self, state: np.ndarray):
        return self.torch.as_tensor(state, device=self.device)

    def to_host(self, state) -> np.ndarray:
        return state.cpu().numpy()

    def step(self, state, js: np.ndarray):
        torch = self.torch
        p = self.params
        m, w, n = p.m, p.per_step, p.n
        ftype = torch.float32 if n <= 1024 else torch.float64
        mats = self.gather(js.reshape(-1)).to(ftype)  # [m*w, n, n]
        vec = state.to(ftype).repeat_interleave(w, dim=0)[:, None, :]  # [m*w, 1, n]
        products = torch.bmm(vec, mats)[:, 0, :].to(torch.int64).reshape(m, w, n)
        low = products & 0xFF
        y = low[:, 0]
        for k in range(1, w):
            y = torch.bitwise_xor(y, low[:, k])
        return (y.T.reshape(m, n) - 128).to(torch.int8)

    def release(self) -> None:
        self.big = None
        self._table = None
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()


@dataclass
class Commitment:
    challenge_id: str
    nonce: str
    roots: bytes  # 32 bytes per state, X_0 .. X_L
    signature: str = ""  # hex Ed25519 over commitment_digest, by the provider's node key
    prover_s: float = 0.0  # the prover's own timing (informative; the verifier times itself)
    backend: str = ""

    def to_dict(self) -> dict:
        return {
            "challenge_id": self.challenge_id,
            "nonce": self.nonce,
            "roots": base64.b64encode(self.roots).decode(),
            "signature": self.signature,
            "prover_s": self.prover_s,
            "backend": self.backend,
        }

    @classmethod
    def from_dict(cls, raw: object, params: Params) -> Commitment:
        if not isinstance(raw, dict):
            raise ProofError("malformed commitment: not a JSON object")
        try:
            if not isinstance(raw["roots"], str) or len(raw["roots"]) > 4 * 32 * params.steps + 64:
                raise ValueError("roots must be base64 of the state roots")
            if not isinstance(raw.get("prover_s", 0.0), int | float):
                raise ValueError("prover_s must be a number")
            roots = base64.b64decode(raw["roots"], validate=True)
            made = cls(
                str(raw["challenge_id"]),
                str(raw["nonce"]),
                roots,
                str(raw.get("signature", "")),
                float(raw.get("prover_s", 0.0)),
                str(raw.get("backend", ""))[:32],
            )
        except (KeyError, TypeError, ValueError, OverflowError, binascii.Error) as exc:
            raise ProofError(f"malformed commitment: {str(exc)[:200]}") from None
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
    """Proves one challenge: `fill()` (untimed), then `walk(nonce)` (timed), then
    `open()`. Keeps the walk's states ((L + 1) m n bytes, bounded by the parameters) to
    answer openings, and nothing else."""

    challenge: Challenge
    backend: NumpyBackend = field(default_factory=NumpyBackend)
    states: list[np.ndarray] = field(default_factory=list)
    on_progress: Callable[[str, float], None] = lambda _what, _fraction: None
    filled: bool = False

    def fill(self) -> float:
        params = self.challenge.params
        t0 = time.perf_counter()
        k0, keys = self.challenge.keys()
        self.backend.allocate(params)
        for start in range(0, params.matrices, GENERATE_CHUNK):
            stop = min(params.matrices, start + GENERATE_CHUNK)
            self.backend.fill(k0, keys, start, stop)
            self.on_progress("filling memory", stop / params.matrices)
        self.filled = True
        return time.perf_counter() - t0

    def walk(self, nonce: str) -> Commitment:
        if not self.filled:
            raise ProofError("the walk needs the filled memory; fill first")
        params = self.challenge.params
        t0 = time.perf_counter()
        host = self.challenge.first_state(nonce)
        self.states = [host]
        roots = [P.merkle_root(0, host)]
        state = self.backend.from_host(host)
        for step in range(1, params.steps + 1):
            js = P.indices(roots[-1], step, params)
            host, root = self.settle(step, self.backend.to_host(self.step(state, js)))
            state = self.backend.from_host(host)
            self.states.append(host)
            roots.append(root)
            if step % 16 == 0 or step == params.steps:
                self.on_progress("walking", step / params.steps)
        return Commitment(
            self.challenge.id,
            nonce,
            b"".join(roots),
            prover_s=time.perf_counter() - t0,
            backend=self.backend.name,
        )

    def step(self, state, js: np.ndarray):
        """One walk step; a cheating subclass overrides this."""
        return self.backend.step(state, js)

    def settle(self, step: int, host: np.ndarray) -> tuple[np.ndarray, bytes]:
        """The state committed for `step` and its root; a cheating subclass overrides
        this to steer the next step's reads."""
        return host, P.merkle_root(step, host)

    def release(self) -> None:
        self.backend.release()
        self.filled = False

    def open(self, wanted: list[tuple[int, int, int]]) -> bytes:
        """The rows and paths for each opening (step, r, c), in order, as bytes."""
        params = self.challenge.params
        if len(self.states) != params.steps + 1:
            raise ProofError("nothing to open: the walk has not run")
        levels: dict[int, list[list[bytes]]] = {}
        out = bytearray()
        for step, r, c in wanted:
            if not (1 <= step <= params.steps and 0 <= r < params.m and 0 <= c < params.n):
                raise ProofError(f"opening ({step}, {r}, {c}) is outside the challenge")
            prev_row, row, _col = P.opened_rows(params, step, r, c)
            for state, index in ((step - 1, prev_row), (step, row)):
                if state not in levels:
                    levels[state] = P.merkle_levels(state, self.states[state])
                out += self.states[state][index].tobytes()
                out += b"".join(P.merkle_path(levels[state], index))
        return bytes(out)
