"""Dishonest provers: what the protocol must catch or make too slow. Each answers as
cheaply as we know how (the same fastest generator the honest prover fills with), so
the figures `bench/proof.py` measures and the tests count are the protocol's margin
against a capable cheater, not against a clumsy one.

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

from gpuprovider.proof import protocol as P
from gpuprovider.proof.prover import NumpyBackend, Prover, TorchBackend


class PartialMemoryBackend(NumpyBackend):
    """Stores the first `keep` fraction of the matrices and makes the others when read."""

    name = "numpy-partial"

    def __init__(self, keep: float) -> None:
        super().__init__()
        self.keep = keep
        self.made = 0  # matrices made again during the walk

    def allocate(self, params: P.Params) -> None:
        self.params, self.kept = params, int(params.matrices * self.keep)
        self.big = np.empty((self.kept, params.n, params.n), dtype=np.int8)

    def fill(self, k0: int, keys: np.ndarray, start: int, stop: int) -> None:
        self.k0, self.keys = k0, keys
        if start < self.kept:
            end = min(stop, self.kept)
            made = P.make_matrices(k0, keys[start:end], self.params.n, self.params.rounds)
            self.big[start:end] = made

    def missing(self, js: np.ndarray) -> int:
        return int((js >= self.kept).sum())

    def gather(self, js: np.ndarray) -> np.ndarray:
        n = self.params.n
        out = np.empty((len(js), n, n), dtype=np.int8)
        kept = js < self.kept
        out[kept] = self.big[js[kept]]
        if (~kept).any():
            # each distinct missing matrix once per step: the cheapest way to make them
            wanted, where = np.unique(js[~kept], return_inverse=True)
            made = P.make_matrices(self.k0, self.keys[wanted], n, self.params.rounds)
            out[~kept] = made[where]
            self.made += len(wanted)
        return out


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
        best = None
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
