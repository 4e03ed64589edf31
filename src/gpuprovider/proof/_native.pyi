# The C kernels of _native.c (buffers: writable or read-only objects with the buffer protocol).
from typing_extensions import Buffer

def matrix_words(out: Buffer, keys: Buffer, k0: int, n: int, rounds: int, /) -> None: ...
def column_words(
    out: Buffer, cols: Buffer, keys: Buffer, k0: int, n: int, rounds: int, /
) -> None: ...
def walk_step(
    out: Buffer,
    state: Buffer,
    big: Buffer,
    js: Buffer,
    m: int,
    n: int,
    first: int,
    stop: int,
    extra: Buffer | None = None,
    /,
) -> None: ...
def copy(dst: Buffer, src: Buffer, /) -> None: ...
def read_sum(src: Buffer, /) -> int: ...
