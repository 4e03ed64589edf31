"""Proof of GPU, the shared part: parameters, the seeded generator, the chain step,
Merkle commitments, index selection and the wire formats. numpy and torch compute
every value here bit for bit alike (see docs/proof-of-gpu.md for the argument).

The chain, with `X` an m x n int8 state and `M_j` n x n int8 matrices:

    X_0 = seeded;  for step i = 1..L:
      j_1..j_w = indices(root of the state that opened this epoch, i)
      Y = XOR_k lowbyte(X_{i-1} @ M_{j_k})        (int8 x int8 -> int32, exact)
      X_i = (Y^T reshaped to m x n) - 128

Every output row of X_i depends on every row of X_{i-1} (through the transpose), so
no row can be computed alone; the next indices depend on a Merkle root of the state,
so they cannot be known, steered or prefetched before the work that makes it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MASK = 0xFFFFFFFF
VERSION = "gpuprovider-pog-v1"
MAX_ROWS = 4096  # m
MAX_N = 16384  # K < 2^17 keeps int32 sums exact; this bounds messages far below that


class ProofError(ValueError):
    """A malformed or impossible challenge, commitment or opening."""


def mix32(x):
    """A 32-bit integer mixer (xorshift-multiply) on int64 arrays of values < 2^32; the
    multipliers stay below 2^31 so products fit int64 in numpy and torch alike."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK
    x = x ^ (x >> 15)
    x = (x * 0x446CA68B) & MASK
    return x ^ (x >> 16)


@dataclass(frozen=True)
class Params:
    n: int  # matrices are n x n, the state m x n
    m: int
    matrices: int  # M: how many n x n int8 matrices fill the claimed memory
    per_step: int  # w: matrices used by each step
    steps: int  # L
    epoch: int  # E: steps sharing one index seed (one Merkle root on the critical path)
    openings: int  # k

    def validate(self) -> None:
        problems = []
        if not (8 <= self.n <= MAX_N and self.n % 8 == 0):
            problems.append(f"n must be a multiple of 8 in [8, {MAX_N}]")
        if not (2 <= self.m <= MAX_ROWS and self.m & (self.m - 1) == 0 and self.m <= self.n):
            problems.append(f"m must be a power of two in [2, min(n, {MAX_ROWS})]")
        if not 1 <= self.per_step <= 1024:
            problems.append("per_step must be in [1, 1024]")
        if not 1 <= self.matrices <= 1 << 24:
            problems.append("matrices must be in [1, 2^24]")
        if not 1 <= self.steps <= 1 << 20:
            problems.append("steps must be in [1, 2^20]")
        if not 1 <= self.epoch <= self.steps:
            problems.append("epoch must be in [1, steps]")
        if not 1 <= self.openings <= 100_000:
            problems.append("openings must be in [1, 100000]")
        if problems:
            raise ProofError("bad proof parameters: " + "; ".join(problems))

    @property
    def matrix_bytes(self) -> int:
        return self.n * self.n

    @property
    def covered_bytes(self) -> int:
        return self.matrices * self.matrix_bytes

    @property
    def depth(self) -> int:
        return self.m.bit_length() - 1

    @property
    def opening_bytes(self) -> int:
        """Bytes one opening takes on the wire: two rows and their Merkle paths."""
        return 2 * (self.n + 32 * self.depth)


def openings_for(target_bits: int = 40, skipped: float = 0.01) -> int:
    """Openings that accept a prover skipping `skipped` of the work with probability
    below 2^-target_bits. A skipped entry is a guess, right with probability 1/256."""
    caught = skipped * 255 / 256
    return math.ceil(target_bits * math.log(2) / -math.log1p(-caught))


def false_accept(openings: int, skipped: float) -> float:
    """Probability that `openings` random openings all miss the skipped work."""
    return (1 - skipped * 255 / 256) ** openings


def params_for_memory(
    memory_bytes: int,
    n: int = 1024,
    m: int = 64,
    per_step: int = 16,
    uses: int = 8,
    epoch: int = 8,
    fill: float = 0.95,
    openings: int | None = None,
) -> Params:
    """Enough matrices to fill `fill` of the memory, each used `uses` times on average."""
    matrices = math.ceil(fill * memory_bytes / (n * n))
    steps = max(1, math.ceil(uses * matrices / per_step))
    params = Params(
        n=n,
        m=m,
        matrices=matrices,
        per_step=per_step,
        steps=steps,
        epoch=min(epoch, steps),
        openings=openings or openings_for(),
    )
    params.validate()
    return params


@dataclass(frozen=True)
class Challenge:
    id: str  # random, hex
    seed: str  # 32 random bytes, hex
    gpu_uuid: str
    provider_key: str  # the provider node's Ed25519 public key, hex
    params: Params

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Challenge:
        try:
            params = Params(**raw["params"])
            challenge = cls(
                id=str(raw["id"]),
                seed=str(raw["seed"]),
                gpu_uuid=str(raw["gpu_uuid"]),
                provider_key=str(raw["provider_key"]),
                params=params,
            )
        except (KeyError, TypeError) as exc:
            raise ProofError(f"malformed challenge: {exc}") from None
        params.validate()
        for name, value, size in (("seed", challenge.seed, 32), ("id", challenge.id, 16)):
            try:
                if len(bytes.fromhex(value)) != size:
                    raise ValueError
            except ValueError:
                raise ProofError(f"challenge {name} must be {size} bytes in hex") from None
        return challenge

    @property
    def master(self) -> bytes:
        """Everything the work depends on: a proof made for another seed, GPU, provider
        or size is a different computation."""
        p = self.params
        text = f"{VERSION}|{self.seed}|{self.gpu_uuid}|{self.provider_key}|"
        text += f"{p.n}|{p.m}|{p.matrices}|{p.per_step}|{p.steps}|{p.epoch}"
        return hashlib.sha256(text.encode()).digest()

    def keys(self) -> tuple[int, np.ndarray]:
        """(table key, per-matrix keys for j = 0..M, the last one seeding X_0)."""
        master = self.master
        k0, k1, k2 = (int.from_bytes(master[i : i + 4], "little") for i in (0, 4, 8))
        j = np.arange(self.params.matrices + 1, dtype=np.int64)
        return k0, mix32(mix32(j ^ k1) ^ k2)


ROUNDS = 3  # keyed mixing rounds per word: what regenerating a matrix costs


def words(base, keys):
    """Matrix words from table entries and per-matrix keys: ROUNDS keyed mix32 rounds.
    Filling memory pays this once per matrix; a prover that dropped a matrix pays it on
    every use."""
    x = base
    for _ in range(ROUNDS):
        x = mix32((x + keys) & MASK)
    return x


def table(xp, k0: int, n: int, like=None):
    """The per-challenge table T[l] = mix32(l ^ k0) for l < n*n/4, shared by all matrices."""
    if xp is np:
        local = np.arange(n * n // 4, dtype=np.int64)
    else:
        local = xp.arange(n * n // 4, dtype=xp.int64, device=like)
    return mix32(local ^ k0)


def bytes_to_int8(xp, words, n_rows: int):
    """Split 32-bit words (..., n/4) into bytes (..., n) and centre them on int8."""
    shifts = [0, 8, 16, 24]
    parts = [(words >> s) & 0xFF for s in shifts]
    stacked = xp.stack(parts, -1)
    return stacked.reshape(*words.shape[:-1], n_rows) - 128


def columns(k0: int, keys: np.ndarray, n: int, cols: np.ndarray) -> np.ndarray:
    """Columns cols[o] of matrices with keys[o, k]: shape (openings, w, n), int64."""
    local = cols[:, None, None] * (n // 4) + np.arange(n // 4, dtype=np.int64)[None, None, :]
    return bytes_to_int8(np, words(mix32(local ^ k0), keys[:, :, None]), n)


def indices(root: bytes, step: int, params: Params) -> np.ndarray:
    """The w matrix indices of `step`, from the root of the state opening its epoch."""
    raw = hashlib.shake_256(b"idx" + root + step.to_bytes(4, "little")).digest(8 * params.per_step)
    return (np.frombuffer(raw, dtype="<u8") % params.matrices).astype(np.int64)


def epoch_start(step: int, params: Params) -> int:
    return (step - 1) // params.epoch * params.epoch


def leaf(state: int, row: int, data: bytes) -> bytes:
    return hashlib.sha256(
        b"\0" + state.to_bytes(4, "little") + row.to_bytes(4, "little") + data
    ).digest()


def node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\1" + left + right).digest()


def merkle_levels(state: int, rows: np.ndarray) -> list[list[bytes]]:
    """All levels of the tree over a state's rows, leaves first, the root last."""
    level = [leaf(state, r, rows[r].tobytes()) for r in range(rows.shape[0])]
    levels = [level]
    while len(level) > 1:
        level = [node(level[i], level[i + 1]) for i in range(0, len(level), 2)]
        levels.append(level)
    return levels


def merkle_path(levels: list[list[bytes]], row: int) -> list[bytes]:
    path = []
    for level in levels[:-1]:
        path.append(level[row ^ 1])
        row //= 2
    return path


def root_from_path(state: int, row: int, data: bytes, path: list[bytes]) -> bytes:
    digest = leaf(state, row, data)
    for sibling in path:
        digest = node(digest, sibling) if row % 2 == 0 else node(sibling, digest)
        row //= 2
    return digest


def commitment_digest(challenge_id: str, roots: bytes) -> bytes:
    """What the provider signs: this challenge and every state root."""
    return hashlib.sha256(VERSION.encode() + bytes.fromhex(challenge_id) + roots).digest()


def opened_rows(params: Params, step: int, r: int, c: int) -> tuple[int, int, int]:
    """For the checked entry Y_step[r, c]: (row of X_{step-1}, row and column of X_step)."""
    flat = c * params.m + r  # Y^T[c, r] in the m x n reshape
    return r, flat // params.n, flat % params.n
