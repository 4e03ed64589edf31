"""JSON from outside (a request body, a market's or a prover's answer), parsed within
limits before anything reads it: its size, how deep it nests, how large its numbers
are. What is over a limit is refused with ValueError naming the limit, never a
RecursionError, an OverflowError or an infinity deep inside the code that reads it."""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_BYTES = 4 << 20
MAX_DEPTH = 32
MAX_INT_DIGITS = 19  # int64 and then some; money and counts are far below
# A string (skipped whole, escapes included) or a bracket: the brackets outside strings
# are the nesting.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


class TooDeep(ValueError):
    pass


def depth_of(raw: bytes) -> int:
    """How deep `raw` nests (an unterminated string ends the scan: json says why)."""
    depth = deepest = 0
    for match in _TOKENS.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"a number of {len(text)} digits is too large")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is not a finite number")
    return value


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(
    raw: bytes | str,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    numbers: bool = True,
) -> Any:
    """`raw` as JSON, or ValueError saying what is wrong or over which limit. With
    `numbers` false, numbers are left as JSON has them, for a typed model to bound (and
    name the field of)."""
    data = raw.encode() if isinstance(raw, str) else raw
    if len(data) > max_bytes:
        raise ValueError(f"{len(data)} bytes is more than the limit of {max_bytes}")
    if (deepest := depth_of(data)) > max_depth:
        raise TooDeep(f"nested too deep ({deepest} levels; at most {max_depth})")
    hooks: dict[str, Any] = {}
    if numbers:
        hooks = {"parse_int": _int, "parse_float": _float, "parse_constant": _constant}
    try:
        return json.loads(data, **hooks)
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg} at byte {exc.pos}") from None
