"""A prover that keeps only part of the matrices resident: what the timing window must catch.

Its answers are right (it regenerates a missing matrix on each use), so the openings
accept it; it does more work instead. `tests/test_proof.py` counts that work exactly and
`bench/proof.py` times it against an honest prover in the same run.
"""

from __future__ import annotations

import numpy as np

from gpuprovider.proof.protocol import Params
from gpuprovider.proof.prover import NumpyBackend


class PartialMemoryBackend(NumpyBackend):
    """Stores the first `keep` fraction of the matrices and regenerates the others when used."""

    name = "numpy-partial"

    def __init__(self, keep: float) -> None:
        super().__init__()
        self.keep = keep
        self.generated = 0  # matrices generated, at fill time and on use

    def allocate(self, params: Params) -> None:
        self.params, self.kept = params, int(params.matrices * self.keep)
        self.big = np.empty((self.kept, params.n, params.n), dtype=np.int8)

    def generate(self, k0: int, keys: np.ndarray, n: int, start: int, stop: int) -> None:
        self.k0, self.keys = k0, keys
        if start < self.kept:
            end = min(stop, self.kept)
            self.big[start:end] = self.make(k0, keys[start:end], n)
            self.generated += end - start

    def matrices(self, js: np.ndarray) -> np.ndarray:
        out = np.empty((len(js), self.params.n, self.params.n), dtype=np.int8)
        kept = js < self.kept
        out[kept] = self.big[js[kept]]
        if (~kept).any():
            out[~kept] = self.make(self.k0, self.keys[js[~kept]], self.params.n)
            self.generated += int((~kept).sum())
        return out
