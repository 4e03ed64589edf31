"""The status file a stage may write to say how it ended: `gpuprovider-status.json` in
its working folder, `{"level": "ok" | "temporary" | "permanent" | "critical" | "abort",
"reason": "..."}`. Written by tenant code: it is read without following links, only if
it is a small regular file written during the attempt, and anything malformed is a
permanent failure saying so (never an error of the daemon's)."""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass

from gpuprovider.pipelines.spec import Level

STATUS_FILE = "gpuprovider-status.json"
MAX_STATUS_BYTES = 4096
MAX_REASON = 500


@dataclass(frozen=True)
class Status:
    level: Level | None  # None: the stage says it succeeded
    reason: str


def read_status(folder: str, since: float) -> Status | None:
    """The stage's own word on how it ended, or None when it wrote none (this attempt)."""
    path = os.path.join(folder, STATUS_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return Status(Level.PERMANENT, f"status file {STATUS_FILE} is a link; not read")
        return None
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            return Status(Level.PERMANENT, f"status file {STATUS_FILE} is not a regular file")
        if found.st_mtime < since - 1.0:  # an earlier stage's or attempt's
            return None
        if found.st_size > MAX_STATUS_BYTES:
            return Status(
                Level.PERMANENT,
                f"status file {STATUS_FILE} has {found.st_size} bytes; at most {MAX_STATUS_BYTES}",
            )
        raw = os.read(fd, MAX_STATUS_BYTES + 1)
    except OSError as exc:
        return Status(Level.PERMANENT, f"status file {STATUS_FILE} unreadable: {exc.strerror}")
    finally:
        os.close(fd)
    return parse_status(raw)


def parse_status(raw: bytes) -> Status:
    if len(raw) > MAX_STATUS_BYTES:
        return Status(
            Level.PERMANENT, f"status file {STATUS_FILE} is over {MAX_STATUS_BYTES} bytes"
        )
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return Status(Level.PERMANENT, f"status file {STATUS_FILE} is not JSON")
    if not isinstance(data, dict) or not isinstance(data.get("level"), str):
        return Status(Level.PERMANENT, f'status file {STATUS_FILE} has no "level" text')
    reason = data.get("reason", "")
    if not isinstance(reason, str):
        reason = ""
    reason = "".join(c if c.isprintable() else "?" for c in reason[:MAX_REASON])
    level = data["level"]
    if level == "ok":
        return Status(None, reason)
    if level not in Level._value2member_map_:
        return Status(
            Level.PERMANENT,
            f"status file {STATUS_FILE}: level {level[:40]!r} is none of ok, " + ", ".join(Level),
        )
    return Status(Level(level), reason)
