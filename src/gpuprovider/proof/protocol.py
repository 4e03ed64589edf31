"""Proof of GPU, the shared part: parameters, the seeded generator, the walk step,
Merkle commitments, index selection and the wire formats. numpy and torch compute
every value here bit for bit alike (docs/proof-of-gpu.md has the design and its bounds).

Two phases. The *fill* (untimed) writes M int8 n x n matrices, every 32-bit word of
them `rounds` keyed mixing rounds away from its position: any word can be computed
alone (the verifier needs that), but every word costs `rounds` rounds to make again.
The *walk* (timed) starts from a state seeded by a nonce sent only once the fill is
done and runs L steps, each reading m * w matrices chosen by the previous state:

    X_0 = from the nonce;  for step i = 1..L:
      J = indices(Merkle root of X_{i-1}, i)            (m x w, one root per step)
      Y[r] = XOR_k lowbyte(X_{i-1}[r] @ M_{J[r,k]})     (int8 x int8 -> int32, exact)
      X_i = (Y^T reshaped to m x n) - 128

Each step's reads are known only once the state before it exists (sequential, random,
data-dependent), every row of X_i depends on every row of X_{i-1} (the transpose), and a
prover missing a matrix must make it again, `rounds` rounds per word, before the step
can go on.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from gpuprovider.domain.usability import PROOF_PROTOCOL
from gpuprovider.proof import native

MASK = 0xFFFFFFFF
# v3: the native and fused kernels, the rounds chosen per model against the fastest
# generator anyone can write, challenge ids used once. A verdict of another version
# does not count (docs/proof-of-gpu.md).
VERSION = PROOF_PROTOCOL
MAX_ROWS = 4096  # m
MAX_N = 16384  # K < 2^17 keeps int32 sums exact; this bounds messages far below that
MAX_STATE_BYTES = 1 << 30  # every state the prover keeps for openings, together
MAX_USES = 64  # reads per matrix over the walk, on average

# What the verifier asks for by default (docs/proof-of-gpu.md derives each figure).
SKIP_BOUND_BITS = 40  # a prover skipping >= SKIP_FRACTION of the work passes < 2^-40
SKIP_FRACTION = 0.05
CHECKS_PER_STEP = 5  # a step computed from a guessed state passes < 256^-5 = 2^-40
FILL_FRACTION = 0.9  # of the catalogue's memory (the CUDA context and rounding need the rest)


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


def mix32_u32(x: np.ndarray) -> np.ndarray:
    """mix32 in place on a uint32 array: the same bits, without int64 or masks (the
    fastest numpy form, used by the verifier and by every prover on the CPU)."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x446CA68B)
    x ^= x >> np.uint32(16)
    return x


@dataclass(frozen=True)
class Params:
    n: int  # matrices are n x n, the state m x n
    m: int  # state rows, each reading its own w matrices per step
    per_step: int  # w: matrices each row reads per step
    matrices: int  # M: how many n x n int8 matrices fill the memory
    steps: int  # L: walk steps
    rounds: int  # keyed mixing rounds per 32-bit word: what making a word costs
    checks: int  # openings per step

    def validate(self) -> None:
        problems = []
        if not (8 <= self.n <= MAX_N and self.n % 8 == 0):
            problems.append(f"n must be a multiple of 8 in [8, {MAX_N}]")
        if not (2 <= self.m <= MAX_ROWS and self.m & (self.m - 1) == 0 and self.m <= self.n):
            problems.append(f"m must be a power of two in [2, min(n, {MAX_ROWS})]")
        if not 1 <= self.per_step <= 256:
            problems.append("per_step must be in [1, 256]")
        if not 1 <= self.matrices <= 1 << 24:
            problems.append("matrices must be in [1, 2^24]")
        if not 1 <= self.steps <= 1 << 16:
            problems.append("steps must be in [1, 2^16]")
        if not 1 <= self.rounds <= 1024:
            problems.append("rounds must be in [1, 1024]")
        if not 1 <= self.checks <= 4096 or self.openings > 100_000:
            problems.append("checks must be in [1, 4096], at most 100000 openings in all")
        if not problems and self.uses > MAX_USES:
            problems.append(f"each matrix would be read {self.uses:.0f} times; at most {MAX_USES}")
        if not problems and self.state_bytes > MAX_STATE_BYTES:
            problems.append(
                f"the walk's states take {self.state_bytes} bytes; at most {MAX_STATE_BYTES}"
            )
        if problems:
            raise ProofError("bad proof parameters: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, raw: Any) -> Params:
        names = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or set(raw) != names:
            raise ProofError(f"proof parameters must be exactly {sorted(names)}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in raw.values()):
            raise ProofError("proof parameters must be integers")
        params = cls(**raw)
        params.validate()
        return params

    @property
    def matrix_bytes(self) -> int:
        return self.n * self.n

    @property
    def covered_bytes(self) -> int:
        return self.matrices * self.matrix_bytes

    @property
    def reads_per_step(self) -> int:
        return self.m * self.per_step

    @property
    def uses(self) -> float:
        return self.steps * self.reads_per_step / self.matrices

    @property
    def openings(self) -> int:
        return self.steps * self.checks

    @property
    def state_bytes(self) -> int:
        return (self.steps + 1) * self.m * self.n

    @property
    def depth(self) -> int:
        return self.m.bit_length() - 1

    @property
    def opening_bytes(self) -> int:
        """Bytes one opening takes on the wire: two rows and their Merkle paths."""
        return 2 * (self.n + 32 * self.depth)


def false_accept(openings: int, skipped: float) -> float:
    """Probability that `openings` random openings all miss work skipped on a fraction
    `skipped` of the entries (a skipped entry is a guess, right with probability 1/256)."""
    return (1 - skipped * 255 / 256) ** openings


def openings_for(target_bits: int = SKIP_BOUND_BITS, skipped: float = SKIP_FRACTION) -> int:
    """Openings that accept a prover skipping `skipped` of the work with probability
    below 2^-target_bits."""
    return math.ceil(target_bits * math.log(2) / -math.log1p(-skipped * 255 / 256))


def grinding_gain(keep: float, reads: int, tries: int) -> float:
    """The fraction of its missing reads a prover keeping `keep` of the matrices avoids,
    in expectation, by trying `tries` roots per step and walking from the best: the
    missing count per step is Binomial(reads, 1 - keep), and the expected minimum of
    `tries` draws is at most sd * sqrt(2 ln tries) under the mean (normal approximation)."""
    if tries <= 1 or keep <= 0:
        return 0.0
    return min(1.0, math.sqrt(2 * math.log(tries) * keep / ((1 - keep) * reads)))


def params_for_memory(
    memory_bytes: int,
    n: int = 1024,
    m: int = 256,
    per_step: int = 8,
    uses: int = 16,
    rounds: int = 128,
    fill: float = FILL_FRACTION,
) -> Params:
    """Enough matrices to fill `fill` of the memory, each read `uses` times on average,
    and enough openings per step for both bounds (skipped work, guessed states)."""
    matrices = max(1, math.ceil(fill * memory_bytes / (n * n)))
    steps = max(1, math.ceil(uses * matrices / (m * per_step)))
    checks = max(CHECKS_PER_STEP, math.ceil(openings_for() / steps))
    params = Params(n, m, per_step, matrices, steps, rounds, checks)
    params.validate()
    return params


def check_hex(value: Any, size: int, name: str) -> str:
    try:
        if isinstance(value, str) and len(bytes.fromhex(value)) == size:
            return value
    except ValueError:
        pass
    raise ProofError(f"{name} must be {size} bytes in hex")


@dataclass(frozen=True)
class Challenge:
    id: str  # random, hex
    seed: str  # 32 random bytes, hex: the fill
    gpu_uuid: str
    model: str  # the catalogue model the verifier proves (from its own knowledge)
    provider_key: str  # the provider node's Ed25519 public key, hex (pinned by the verifier)
    params: Params

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> Challenge:
        if not isinstance(raw, dict):
            raise ProofError("a challenge is a JSON object")
        try:
            challenge = cls(
                id=check_hex(raw["id"], 16, "challenge id"),
                seed=check_hex(raw["seed"], 32, "challenge seed"),
                gpu_uuid=str(raw["gpu_uuid"])[:96],
                model=str(raw["model"])[:64],
                provider_key=check_hex(raw["provider_key"], 32, "provider key"),
                params=Params.from_dict(raw["params"]),
            )
        except KeyError as exc:
            raise ProofError(f"malformed challenge: missing {exc}") from None
        return challenge

    @property
    def master(self) -> bytes:
        """Everything the work depends on: a proof made for another seed, GPU, model,
        provider or size is a different computation."""
        p = self.params
        text = f"{VERSION}|{self.seed}|{self.gpu_uuid}|{self.model}|{self.provider_key}|"
        text += "|".join(str(getattr(p, f.name)) for f in fields(p))
        return hashlib.sha256(text.encode()).digest()

    def keys(self) -> tuple[int, np.ndarray]:
        """(table key, per-matrix keys for j = 0..M-1)."""
        master = self.master
        k0, k1, k2 = (int.from_bytes(master[i : i + 4], "little") for i in (0, 4, 8))
        j = np.arange(self.params.matrices, dtype=np.int64)
        return k0, mix32(mix32(j ^ k1) ^ k2)

    def first_state(self, nonce: str) -> np.ndarray:
        """X_0, from the walk's nonce: m x n int8."""
        p = self.params
        raw = hashlib.shake_256(b"x0" + self.master + bytes.fromhex(nonce)).digest(p.m * p.n)
        return np.frombuffer(raw, dtype=np.int8).reshape(p.m, p.n).copy()


def words_u32(base: np.ndarray, keys: np.ndarray | np.uint32, rounds: int) -> np.ndarray:
    """Matrix words (uint32) from table entries and matrix keys, `rounds` keyed rounds:
    x <- mix32(x + key). `base` is consumed."""
    x = base
    for _ in range(rounds):
        x += keys
        mix32_u32(x)
    return x


def words(base, keys, rounds: int):
    """The same words on int64 arrays (numpy or torch): the GPU prover's form."""
    x = base
    for _ in range(rounds):
        x = mix32((x + keys) & MASK)
    return x


def table(xp, k0: int, n: int, like=None):
    """The per-challenge table T[l] = mix32(l ^ k0) for l < n*n/4, shared by all matrices;
    word l of a matrix is column l // (n/4), rows 4 (l % (n/4)) .. +3."""
    if xp is np:
        local = np.arange(n * n // 4, dtype=np.int64)
    else:
        local = xp.arange(n * n // 4, dtype=xp.int64, device=like)
    return mix32(local ^ k0)


def bytes_to_int8(xp, words, n_rows: int):
    """Split 32-bit words (..., n/4) into bytes (..., n) and centre them on int8."""
    parts = [(words >> s) & 0xFF for s in (0, 8, 16, 24)]
    stacked = xp.stack(parts, -1)
    return stacked.reshape(*words.shape[:-1], n_rows) - 128


def make_words(k0: int, keys: np.ndarray, n: int, rounds: int) -> np.ndarray:
    """The words of whole matrices for `keys`: (len(keys), n*n/4) uint32, natively when
    built (the fastest generator we have: AVX2 lanes, one matrix at a time in cache)."""
    made = np.empty((len(keys), n * n // 4), dtype=np.uint32)
    fast = native.module()
    if fast is not None:
        fast.matrix_words(made, np.ascontiguousarray(keys, dtype=np.uint32), k0, n, rounds)
        return made
    base = table(np, k0, n).astype(np.uint32)
    for i, key in enumerate(keys):  # one matrix at a time stays in the CPU's caches
        made[i] = words_u32(base.copy(), np.uint32(key), rounds)
    return made


def words_to_transposed(made: np.ndarray, n: int) -> np.ndarray:
    """Words (count, n*n/4) as the matrices' bytes in generation order, int8: Mt[j][c][l]
    = M_j[l][c] (each matrix transposed: one contiguous run per column), in place."""
    cols = made.view(np.uint8).reshape(len(made), n, n)  # little-endian bytes: [j, col, row]
    cols ^= np.uint8(0x80)  # x - 128 as int8
    return cols.view(np.int8)


def make_transposed(k0: int, keys: np.ndarray, n: int, rounds: int) -> np.ndarray:
    """Whole matrices for `keys`, transposed: (len(keys), n, n) int8 Mt[j][c][l]."""
    return words_to_transposed(make_words(k0, keys, n, rounds), n)


def make_matrices(k0: int, keys: np.ndarray, n: int, rounds: int) -> np.ndarray:
    """Whole matrices for `keys`, (len(keys), n, n) int8 M[j][row][col]."""
    return np.ascontiguousarray(make_transposed(k0, keys, n, rounds).transpose(0, 2, 1))


def columns(k0: int, keys: np.ndarray, n: int, cols: np.ndarray, rounds: int) -> np.ndarray:
    """Column cols[o] of each matrix keys[o, k]: shape (openings, w, n), int64."""
    fast = native.module()
    if fast is not None:
        made = np.empty((*keys.shape, n // 4), dtype=np.uint32)
        fast.column_words(
            made,
            np.ascontiguousarray(cols, dtype=np.int64),
            np.ascontiguousarray(keys, dtype=np.uint32),
            k0,
            n,
            rounds,
        )
    else:
        local = cols[:, None, None] * (n // 4) + np.arange(n // 4, dtype=np.int64)[None, None, :]
        base = np.broadcast_to(mix32(local ^ k0).astype(np.uint32), (*keys.shape, n // 4))
        made = words_u32(base.copy(), keys[:, :, None].astype(np.uint32), rounds)
    return made.view(np.uint8).reshape(*made.shape[:-1], n).astype(np.int64) - 128


def indices(root: bytes, step: int, params: Params) -> np.ndarray:
    """The m x w matrix indices of `step`, from the root of the state before it."""
    count = params.reads_per_step
    raw = hashlib.shake_256(b"idx" + root + step.to_bytes(4, "little")).digest(8 * count)
    picked = np.frombuffer(raw, dtype="<u8") % np.uint64(params.matrices)
    return picked.astype(np.int64).reshape(params.m, params.per_step)


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


def merkle_root(state: int, rows: np.ndarray) -> bytes:
    """The root of a state's tree: natively (libcrypto, threads for large states) when
    built, the prover's part of every step that is on the walk's clock."""
    fast = native.merkle()
    if fast is not None and rows.dtype == np.int8 and rows.flags.c_contiguous:
        return fast.merkle_root(state, rows, rows.shape[0], rows.shape[1])
    return merkle_levels(state, rows)[-1][0]


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


def commitment_digest(challenge_id: str, nonce: str, roots: bytes) -> bytes:
    """What the provider signs: this challenge, this walk and every state root."""
    return hashlib.sha256(
        VERSION.encode() + bytes.fromhex(challenge_id) + bytes.fromhex(nonce) + roots
    ).digest()


def opened_rows(params: Params, step: int, r: int, c: int) -> tuple[int, int, int]:
    """For the checked entry Y_step[r, c]: (row of X_{step-1}, row and column of X_step)."""
    flat = c * params.m + r  # Y^T[c, r] in the m x n reshape
    return r, flat // params.n, flat % params.n
