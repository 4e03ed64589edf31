"""XID errors from the kernel log. NVML does not keep them: the driver prints one line
per error, `NVRM: Xid (PCI:0000:3b:00): 48, pid=1234, name=python3, <text>`, and that is
the only record. Read from `/dev/kmsg` (one record per read) or from a text file that
something appends to (a journal export, a test); only lines written after the reader
opened are read, so a restart never acts on old errors twice."""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass

XID_MARK = "NVRM: Xid"
_XID = re.compile(
    r"NVRM: Xid \((?:PCI:)?(?P<pci>[0-9a-fA-F]{1,8}:[0-9a-fA-F]{1,2}:[0-9a-fA-F]{1,2})"
    r"(?:\.[0-7])?\): (?P<code>\d{1,4})\b(?:, (?P<text>.*))?"
)
MAX_READ_BYTES = 4 << 20  # per poll: a flood is read over several polls, never at once


@dataclass(frozen=True)
class Xid:
    code: int
    pci_bus_id: str  # normalised: `0000:3b:00`
    text: str


def pci_key(bus_id: str) -> str:
    """`00000000:3B:00.0` (NVML) and `0000:3b:00` (the kernel) as one key, `0000:3b:00`;
    empty when it is no PCI address."""
    parts = bus_id.split(".")[0].split(":")
    if len(parts) == 2:
        parts = ["0", *parts]
    try:
        domain, bus, device = (int(p, 16) for p in parts)
    except ValueError:
        return ""
    return f"{domain:04x}:{bus:02x}:{device:02x}"


def parse_line(line: str) -> Xid | None:
    """The XID a kernel log line reports; None when it is about something else.
    ValueError for a line that names an XID but cannot be read."""
    if XID_MARK not in line:
        return None
    found = _XID.search(line)
    if found is None:
        raise ValueError(f"unreadable XID line: {line[:200]!r}")
    return Xid(int(found["code"]), pci_key(found["pci"]), (found["text"] or "").strip()[:500])


class KernelLog:
    """New XIDs since the last `read`, from `/dev/kmsg` or an appended text file. A
    line naming an XID that cannot be parsed is skipped and counted in `malformed`."""

    def __init__(self, path: str):
        self.path = path
        self.malformed = 0
        self.error = ""
        self._fd: int | None = None
        self._device = False
        self._offset = 0
        self._partial = b""

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._device = stat.S_ISCHR(os.fstat(self._fd).st_mode)
        self._offset = os.lseek(self._fd, 0, os.SEEK_END)

    def read(self) -> list[Xid]:
        try:
            if self._fd is None:
                self._open()
                return []
            lines = self._read_device() if self._device else self._read_file()
        except OSError as exc:
            self.error = f"cannot read {self.path}: {exc.strerror or exc}"
            self.close()
            return []
        self.error = ""
        found = []
        for line in lines:
            try:
                xid = parse_line(line)
            except ValueError:
                self.malformed += 1
                continue
            if xid is not None:
                found.append(xid)
        return found

    def _read_device(self) -> list[str]:
        """/dev/kmsg: each read returns one record, `prio,seq,usec,flags;message`."""
        assert self._fd is not None  # read() opens it first
        lines, total = [], 0
        while total < MAX_READ_BYTES:
            try:
                record = os.read(self._fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # records overwritten before we read them
                    continue
                raise
            if not record:
                break
            total += len(record)
            text = record.decode(errors="replace")
            lines.append(text.split(";", 1)[1] if ";" in text.split("\n", 1)[0] else text)
        return lines

    def _read_file(self) -> list[str]:
        assert self._fd is not None  # read() opens it first
        size = os.fstat(self._fd).st_size
        if size < self._offset:  # truncated or replaced: start again from its top
            self._offset, self._partial = 0, b""
        chunk = os.pread(self._fd, MAX_READ_BYTES, self._offset)
        self._offset += len(chunk)
        data = self._partial + chunk
        complete, _, self._partial = data.rpartition(b"\n")
        if len(self._partial) > MAX_READ_BYTES:  # a line with no end: not a log line
            self._partial = b""
            self.malformed += 1
        return complete.decode(errors="replace").splitlines() if complete else []

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def default_kernel_log() -> str:
    """`/dev/kmsg` where this process may read it, else empty (no XIDs)."""
    return "/dev/kmsg" if os.access("/dev/kmsg", os.R_OK) else ""
