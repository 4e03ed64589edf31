"""Durations as people write them in config: `90`, `90s`, `10m`, `1h30m`."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(text: str | float | int) -> float:
    """Seconds in `90`, `90s`, `10m`, `1h30m`; ValueError saying what is expected."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"{text} is negative; a duration is at least 0")
        return float(text)
    found = _DURATION.match(str(text).strip()) if str(text).strip() else None
    if found is None or not any(found.groups()):
        raise ValueError(f"{text!r} is not a duration; write e.g. 30s, 10m, 1h or 1h30m")
    hours, minutes, seconds = (float(g or 0) for g in found.groups())
    return hours * 3600 + minutes * 60 + seconds
