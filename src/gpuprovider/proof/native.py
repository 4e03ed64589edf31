"""The native CPU kernels (`_native.c`, built by `pip install`), or None when they were not
built: every caller then uses the numpy code, which computes the same bits, slower.
`kernel()` names what runs, so figures and verdicts can say it."""

from __future__ import annotations

import os
from types import ModuleType

_loaded: ModuleType | None
_merkle_loaded: ModuleType | None
try:  # optional by design: a machine without a C compiler still proves and verifies
    from gpuprovider.proof import _native as _loaded
except ImportError:  # pragma: no cover - depends on the build
    _loaded = None
try:  # the Merkle root on libcrypto: built only where OpenSSL's headers are
    from gpuprovider.proof import _merkle as _merkle_loaded
except ImportError:  # pragma: no cover - depends on the build
    _merkle_loaded = None

# GPUPROVIDER_PROOF_NATIVE=0 forces numpy (tests compare the two; benches time both)
_wanted = os.environ.get("GPUPROVIDER_PROOF_NATIVE", "1") != "0"


def module() -> ModuleType | None:
    """The compiled kernels when built and wanted, else None."""
    return _loaded if _wanted else None


def merkle() -> ModuleType | None:
    """The native Merkle root when built and wanted, else None (hashlib)."""
    return _merkle_loaded if _wanted else None


def available() -> bool:
    return _loaded is not None


def kernel() -> str:
    """What the CPU prover and verifier run: "native" or "numpy"."""
    return "native" if module() is not None else "numpy"


def use(enabled: bool) -> None:
    """Switch the native kernels on or off for this process (tests and benches)."""
    global _wanted
    _wanted = enabled
