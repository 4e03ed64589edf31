# The Merkle root of _merkle.c (rows: a buffer of m x n uint32 words).
from typing_extensions import Buffer

def merkle_root(state: int, rows: Buffer, m: int, n: int, /) -> bytes: ...
