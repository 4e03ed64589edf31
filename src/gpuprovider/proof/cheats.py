"""Dishonest provers: what the protocol must catch or make too slow. Each answers as
cheaply as we know how to write it: natively (`_native.c`: the AVX2 generator the honest
fill uses, the walk kernel reading at the memory's speed), each missing matrix made once
per step however often the step reads it, straight into a scratch buffer the walk
kernel reads beside the kept ones. So the figures `bench/proof.py` measures are the
protocol's margin against the fastest implementation we can write, not against our own
slow code (v2's mistake: its cheaters ran the numpy walk, 19-40x slower than a native one).

- `PartialMemoryBackend(keep)`: keeps a fraction of the matrices, makes the others on
  each read (right answers, more work: what the timing window must catch).
- `GrindingProver(keep, tries)`: also steers the next step's reads toward matrices it
  kept by changing one entry of each state and trying `tries` roots (one wrong entry
  per step: what the openings can hardly see, so its gain must stay small).
- `SegmentedProver(segments)`: splits the walk in segments that could run at once on
  several devices, each after the first starting from a guessed state.
"""

from __future__ import annotations

import numpy as np

from gpuprovider.proof import native
from gpuprovider.proof import protocol as P
from gpuprovider.proof.prover import NumpyBackend, Prover, TorchBackend


class PartialMemoryBackend(NumpyBackend):
    """Stores the first `keep` fraction of the matrices and makes the others when read."""

    def __init__(self, keep: float) -> None:
        super().__init__()
        self.keep = keep
        self.made = 0  # matrices made again during the walk

    @property
    def name(self) -> str:
        return f"{native.kernel()}-partial"

    def allocate(self, params: P.Params) -> None:
        self.params, self.kept = params, int(params.matrices * self.keep)
        self.big = np.empty((self.kept, params.n, params.n), dtype=np.int8)

    def fill(self, k0: int, keys: np.ndarray, start: int, stop: int) -> None:
        self.k0, self.keys = k0, keys
        if start < self.kept:
            super().fill(k0, keys, start, min(stop, self.kept))

    def missing(self, js: np.ndarray) -> int:
        return int((js >= self.kept).sum())

    def remake(self, js: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indices into kept + made, the matrices made): each distinct missing matrix once."""
        flat = js.reshape(-1)
        lacking = flat >= self.kept
        wanted, where = np.unique(flat[lacking], return_inverse=True)
        made = P.make_transposed(self.k0, self.keys[wanted], self.params.n, self.params.rounds)
        self.made += len(wanted)
        remapped = flat.copy()
        remapped[lacking] = self.kept + where
        return remapped.reshape(js.shape), made

    def step(self, state: np.ndarray, js: np.ndarray) -> np.ndarray:
        fast = native.module()
        if fast is None:
            return self.numpy_step(state, js)
        p = self.params
        remapped, made = self.remake(js)
        out = np.empty((p.m, p.n), dtype=np.int8)
        fast.walk_step(out, state, self.big, remapped, p.m, p.n, 0, p.m, made)
        return out

    def gather(self, js: np.ndarray) -> np.ndarray:
        remapped, made = self.remake(js)
        return np.concatenate([self.big, made])[remapped] if len(made) else self.big[remapped]


class TorchPartialBackend(TorchBackend):
    """PartialMemoryBackend on a GPU: keeps a fraction in device memory, makes the rest
    with the same PyTorch kernels the honest fill uses (not a fused kernel: a cheater
    with one is faster, which docs/proof-of-gpu.md accounts for)."""

    name = "torch-partial"

    def __init__(self, torch, device: str, keep: float) -> None:
        super().__init__(torch, device)
        self.keep, self.made = keep, 0

    def allocate(self, params: P.Params) -> None:
        self.params, self.kept, self._table = params, int(params.matrices * self.keep), None
        self.big = self.torch.empty(
            (self.kept, params.n, params.n), dtype=self.torch.int8, device=self.device
        )

    def fill(self, k0: int, keys: np.ndarray, start: int, stop: int) -> None:
        self.keys = keys
        if self._table is None:
            self._table = P.table(self.torch, k0, self.params.n, like=self.device)
        if start < self.kept:
            super().fill(k0, keys, start, min(stop, self.kept))

    def gather(self, js: np.ndarray):
        torch, n = self.torch, self.params.n
        out = torch.empty((len(js), n, n), dtype=torch.int8, device=self.device)
        kept = js < self.kept
        if kept.any():
            out[torch.as_tensor(np.nonzero(kept)[0], device=self.device)] = self.big[
                torch.as_tensor(js[kept], device=self.device)
            ]
        if (~kept).any():
            wanted, where = np.unique(js[~kept], return_inverse=True)
            made = self.make(self.keys[wanted])
            out[torch.as_tensor(np.nonzero(~kept)[0], device=self.device)] = made[
                torch.as_tensor(where, device=self.device)
            ]
            self.made += len(wanted)
        return out


class GrindingProver(Prover):
    """Before each step, tries `tries` values of the state's last entry and keeps the
    one whose root sends the fewest reads to matrices it did not keep."""

    def __init__(self, challenge: P.Challenge, keep: float, tries: int) -> None:
        super().__init__(challenge, PartialMemoryBackend(keep))
        self.tries = tries
        self.wrong_entries = 0  # entries that differ from the honest walk's
        self.missing_before = self.missing_after = 0

    def settle(self, step: int, host: np.ndarray) -> tuple[np.ndarray, bytes]:
        params = self.challenge.params
        if step == params.steps:
            return super().settle(step, host)
        backend: PartialMemoryBackend = self.backend  # type: ignore[assignment]
        levels = P.merkle_levels(step, host)
        honest = host[-1, -1]
        best: tuple[int, int, bytes] | None = None
        for t in range(self.tries):
            host[-1, -1] = np.int8((int(honest) + 128 + t) % 256 - 128)
            # only the last leaf and its path change: log2(m) + 1 hashes per try
            digest = P.leaf(step, params.m - 1, host[-1].tobytes())
            for sibling in P.merkle_path(levels, params.m - 1):
                digest = P.node(sibling, digest)
            missing = backend.missing(P.indices(digest, step + 1, params).reshape(-1))
            if t == 0:
                self.missing_before += missing
            if best is None or missing < best[0]:
                best = (missing, t, digest)
        assert best is not None  # tries >= 1
        missing, t, digest = best
        self.missing_after += missing
        host[-1, -1] = np.int8((int(honest) + 128 + t) % 256 - 128)
        self.wrong_entries += t != 0
        return host, digest


class SegmentedProver(Prover):
    """The walk in `segments` parts; every part after the first starts from a state
    guessed before the one it follows was known (here: random)."""

    def __init__(self, challenge: P.Challenge, segments: int) -> None:
        super().__init__(challenge, NumpyBackend())
        steps = challenge.params.steps
        self.starts = {steps * s // segments for s in range(1, segments)}

    def step(self, state, js: np.ndarray):
        if len(self.states) in self.starts:  # this step's output is the next part's guess
            rng = np.random.default_rng()
            return rng.integers(-128, 128, state.shape, dtype=np.int8)
        return super().step(state, js)
