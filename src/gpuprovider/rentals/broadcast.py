"""DeepBrainChain's rental status broadcast: when a node turns renting or empty, one UDP
datagram holding `{"node_id": ..., "status": "renting"|"empty"}` as base64 JSON, to the
local network's broadcast address on port 55555, so an owner's DBC-aware scripts (which
stop the owner's own VMs on "renting") keep working."""

from __future__ import annotations

import base64
import json
import logging
import socket

log = logging.getLogger(__name__)


def message(node_id: str, renting: bool) -> bytes:
    status = "renting" if renting else "empty"
    return base64.b64encode(json.dumps({"node_id": node_id, "status": status}).encode())


def read(datagram: bytes) -> dict[str, str]:
    """A datagram back as its fields (for tests and listeners); ValueError if not one."""
    data = json.loads(base64.b64decode(datagram, validate=True))
    if not isinstance(data, dict) or data.get("status") not in ("renting", "empty"):
        raise ValueError("not a rental status message")
    return data


class Broadcaster:
    """Sends each status change; never blocks nor raises (a lost datagram is logged)."""

    def __init__(self, address: str, port: int):
        self.address, self.port = address, port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        self.sock.setblocking(False)

    def changed(self, subjects: set[str]) -> None:
        """`subjects` as the RENTED signal carries them: "<node id>=renting|empty"."""
        for subject in sorted(subjects):
            node_id, _, status = subject.rpartition("=")
            try:
                self.sock.sendto(message(node_id, status == "renting"), (self.address, self.port))
            except OSError as exc:
                log.warning("rental status broadcast to %s:%d failed: %s", self.address,
                            self.port, exc)  # fmt: skip
