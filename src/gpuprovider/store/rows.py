"""Rows to records."""

from __future__ import annotations

from dataclasses import fields
from typing import Any


def record(cls: type, row: Any) -> Any:
    """A dataclass from a row holding (at least) its fields, by name."""
    mapping = row._mapping
    return cls(**{f.name: mapping[f.name] for f in fields(cls) if f.name in mapping})
