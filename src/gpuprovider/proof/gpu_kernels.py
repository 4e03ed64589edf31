"""The GPU prover at the memory's limit: Triton kernels for the fill (fused: every word
made in registers and written once) and the walk step (fused: each matrix byte read once
per use, multiplied and summed in registers, the low bytes XORed, the next state written
transposed), computing the bits of `protocol.py` (tested against numpy in Triton's
interpreter on the CPU: `tests/test_proof.py`).

NOT YET RUN ON A GPU: no NVIDIA GPU was lent while this was written. `bench/gpu.sh`
runs it on one (identity against the CPU prover, the walk's bandwidth, calibration).

Layout as on the CPU (`_native.c`): each matrix kept transposed in generation order,
Mt[j][c][l] = M_j[l][c], so the walk reads one contiguous run per output column. Sums of
int8 products are taken in int32 lanes that wrap: only the sum mod 256 is used, so
wrapping gives the exact byte on every device.

Per step the host still computes the state's Merkle root (SHA-256 of 1 MiB, natively on
several threads: `_merkle.c`) and the next indices; with 1,024 rows reading 16 matrices
(16 GiB) a step, that is about a millisecond next to ~5 ms of reads on an H100
(`bench/gpu.sh` measures both).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpuprovider.proof.protocol import Params
from gpuprovider.proof.prover import NumpyBackend, TorchBackend

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton comes with PyTorch's CUDA builds
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _mix32(x):
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x446CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _fill(out_ptr, keys_ptr, first, k0, words, rounds, BLOCK: tl.constexpr):
        """Matrix `first + program 0`, words [program 1 * BLOCK, + BLOCK): written as the
        transposed int8 bytes (each byte XOR 0x80, i.e. minus 128)."""
        j = tl.program_id(0)
        block = tl.program_id(1)
        local = block * BLOCK + tl.arange(0, BLOCK)
        inside = local < words
        key = tl.load(keys_ptr + j).to(tl.uint32)
        x = _mix32(local.to(tl.uint32) ^ k0.to(tl.uint32))
        for _ in range(rounds):
            x = _mix32(x + key)
        x = x ^ 0x80808080
        base = (first + j).to(tl.int64) * words
        tl.store(out_ptr + base + local, x.to(tl.int32, bitcast=True), mask=inside)

    @triton.jit
    def _step(
        out_ptr,
        state_ptr,
        big_ptr,
        js_ptr,
        m,
        n,
        w,
        BLOCK_C: tl.constexpr,
        BLOCK_L: tl.constexpr,
    ):
        """Row r (program 0), columns [program 1 * BLOCK_C, + BLOCK_C): Y[r, c] = XOR_k
        low(state[r] . Mt_{js[r, k]}[c]), stored as the next state: out[c * m + r]."""
        r = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        lanes = tl.arange(0, BLOCK_L)
        y = tl.zeros([BLOCK_C], dtype=tl.int32)
        for k in range(w):
            j = tl.load(js_ptr + r * w + k).to(tl.int64)
            matrix = big_ptr + j * n * n
            acc = tl.zeros([BLOCK_C], dtype=tl.int32)
            for l0 in range(0, n, BLOCK_L):
                x = tl.load(state_ptr + r * n + l0 + lanes).to(tl.int32)
                tile = tl.load(matrix + cols[:, None] * n + l0 + lanes[None, :]).to(tl.int32)
                acc += tl.sum(tile * x[None, :], axis=1)
            y = y ^ (acc & 0xFF)
        tl.store(out_ptr + cols.to(tl.int64) * m + r, (y ^ 0x80).to(tl.int8))


FILL_BLOCK = 1024
BLOCK_C, BLOCK_L = 32, 128


class TritonBackend(TorchBackend):
    """The prover on a CUDA GPU with fused kernels (`device` "cpu" only under Triton's
    interpreter, TRITON_INTERPRET=1: how the tests check its bits)."""

    name = "triton"

    def allocate(self, params: Params) -> None:
        if params.n % BLOCK_C or params.n % BLOCK_L:
            raise ValueError(f"the Triton walk needs n a multiple of {BLOCK_L}")
        super().allocate(params)

    def fill(self, k0: int, keys: np.ndarray, start: int, stop: int) -> None:
        torch, p = self.torch, self.params
        words = p.n * p.n // 4
        key = torch.as_tensor(keys[start:stop].astype(np.int64), device=self.device)
        grid = (stop - start, triton.cdiv(words, FILL_BLOCK))
        _fill[grid](self.big.view(torch.int32), key, start, k0, words, p.rounds, BLOCK=FILL_BLOCK)

    def step(self, state: Any, js: np.ndarray) -> Any:
        torch, p = self.torch, self.params
        out = torch.empty((p.m, p.n), dtype=torch.int8, device=self.device)
        index = torch.as_tensor(np.ascontiguousarray(js, np.int64), device=self.device)
        _step[(p.m, p.n // BLOCK_C)](
            out, state, self.big, index, p.m, p.n, p.per_step, BLOCK_C=BLOCK_C, BLOCK_L=BLOCK_L
        )
        return out


def cuda_backend(torch: Any, device: str) -> TorchBackend:
    """The fused Triton prover when Triton is there (PyTorch's CUDA builds bring it),
    else PyTorch's unfused kernels (~11 bytes moved per byte: slower, same bits)."""
    return TritonBackend(torch, device) if available() else TorchBackend(torch, device)


def pick_backend(device: str | None = None) -> NumpyBackend:
    """A GPU prover for "cuda:N", else the CPU one (native kernels when built)."""
    if device and device.startswith("cuda"):
        import torch  # optional: only a GPU prover needs it

        return cuda_backend(torch, device)
    return NumpyBackend()
