"""Rentals: what a tenant asks for (validated once at the edge), and the rental state
machine as one table (the task and service machines' sibling).

A rental is a long-lived environment a tenant logs in to over SSH: a container from an
image, GPUs (or a whole node), a persistent disk, ports on stable numbers. Its
environment runs as a task it owns; stopping it ends that task and keeps the disk,
starting it again makes a new one on the same disk and ports.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gpuprovider.domain.resources import parse_gpu_request
from gpuprovider.domain.spec import DNS_LABEL_PATTERN, IMAGE_PATTERN, MAX_DURATION_S


class RentalState(StrEnum):
    PROVISIONING = "provisioning"  # its environment is being placed and started
    RUNNING = "running"  # its environment runs: SSH answers on its port
    STOPPING = "stopping"  # its environment is being stopped by its tenant
    EVICTING = "evicting"  # its environment is being stopped by the owner
    STOPPED = "stopped"  # nothing runs; the disk and ports are kept
    EXPIRED = "expired"  # its time ran out; the disk is kept until deleted
    EVICTED = "evicted"  # the owner took the machine back; the disk is kept
    DELETED = "deleted"  # the disk is wiped and the ports and name are free


R = RentalState
RENTAL_TRANSITIONS: dict[RentalState, frozenset[RentalState]] = {
    R.PROVISIONING: frozenset({R.RUNNING, R.STOPPING, R.EVICTING, R.STOPPED, R.EXPIRED}),
    R.RUNNING: frozenset({R.PROVISIONING, R.STOPPING, R.EVICTING, R.STOPPED, R.EXPIRED}),
    R.STOPPING: frozenset({R.STOPPED, R.EXPIRED}),
    R.EVICTING: frozenset({R.EVICTED}),
    R.STOPPED: frozenset({R.PROVISIONING, R.DELETED}),
    R.EXPIRED: frozenset({R.PROVISIONING, R.DELETED}),
    R.EVICTED: frozenset({R.PROVISIONING, R.DELETED}),
    R.DELETED: frozenset(),
}
# Its environment runs or is wanted running.
ACTIVE = frozenset({R.PROVISIONING, R.RUNNING})
# Nothing runs: it may be started again or deleted.
AT_REST = frozenset({R.STOPPED, R.EXPIRED, R.EVICTED})

# Key types an SSH server in a rental is asked to accept (no DSA: OpenSSH dropped it).
KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
MAX_KEYS = 16
MAX_PORTS = 8
PORT_NAME_PATTERN = r"^[a-z][a-z0-9]{0,15}$"  # `<rental>-<port>` is a DNS label
RESERVED_PORT_NAMES = frozenset({"ssh"})


def parse_ssh_key(text: str) -> str:
    """An OpenSSH public key line (`TYPE BASE64 [comment]`) as `TYPE BASE64`, checked:
    a known type, base64 that decodes to a key blob naming the same type. ValueError
    saying what is wrong otherwise; the comment is dropped (it is never trusted)."""
    parts = text.strip().split()
    if len(parts) < 2 or len(text) > 16384:
        raise ValueError("is not an OpenSSH public key line: expected `TYPE BASE64 [comment]`")
    kind, blob = parts[0], parts[1]
    if kind not in KEY_TYPES:
        raise ValueError(f"key type {kind[:40]!r} is not one of {', '.join(sorted(KEY_TYPES))}")
    try:
        raw = base64.b64decode(blob, validate=True)
        (length,) = struct.unpack(">I", raw[:4])
        named = raw[4 : 4 + length].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError, ValueError):
        raise ValueError(f"the {kind} key's base64 is not a key blob") from None
    if named != kind or len(raw) < 4 + length + 4 + 16:
        raise ValueError(f"the key blob says {named[:40]!r}, its line says {kind}")
    return f"{kind} {blob}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RentalPort(_Strict):
    """A TCP port of the rental: the same number inside and outside, stable for the
    rental's life; chosen from `[rentals] port_range` unless the tenant names one. An
    `http` port is also served by the gateway as `<rental>-<name>`, with the tenant's
    tokens, as services are."""

    name: Annotated[str, Field(pattern=PORT_NAME_PATTERN)]
    port: int | None = Field(None, ge=1, le=65535)
    http: bool = False


class RentalSpec(_Strict):
    name: Annotated[str, Field(pattern=DNS_LABEL_PATTERN, max_length=32)]
    image: Annotated[str, Field(pattern=IMAGE_PATTERN, max_length=512)]
    gpu: str = Field("0", description="count, fraction or constraint: 2, 0.5, H100:80GB:2")
    whole_node: bool = Field(False, description="every GPU, CPU and memory of one node")
    cpu: float = Field(1.0, ge=0, le=4096)
    memory_mib: int = Field(1024, ge=0, le=64 * 1024 * 1024)
    disk_gib: float = Field(1.0, gt=0, le=1024 * 1024)
    duration_s: float | None = Field(None, gt=0, le=MAX_DURATION_S)
    ssh_keys: list[str] = Field(min_length=1, max_length=MAX_KEYS)
    ports: list[RentalPort] = Field(default_factory=list, max_length=MAX_PORTS)

    @field_validator("gpu", mode="before")
    @classmethod
    def _read_gpu(cls, value: Any) -> str:
        return parse_gpu_request(value).to_text()

    @field_validator("ssh_keys")
    @classmethod
    def _check_keys(cls, value: list[str]) -> list[str]:
        keys = []
        for i, line in enumerate(value):
            try:
                keys.append(parse_ssh_key(line))
            except ValueError as exc:
                raise ValueError(f"ssh_keys[{i}] {exc}") from None
        return list(dict.fromkeys(keys))

    @model_validator(mode="after")
    def _check_whole(self) -> RentalSpec:
        names = [p.name for p in self.ports]
        if len(set(names)) != len(names):
            raise ValueError(f"ports: names must differ, got {names}")
        if reserved := RESERVED_PORT_NAMES & set(names):
            raise ValueError(f"ports: {sorted(reserved)} is the provider's (the SSH port)")
        numbers = [p.port for p in self.ports if p.port is not None]
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"ports: numbers must differ, got {numbers}")
        return self


def route_name(rental: str, port: str) -> str:
    """The gateway's name for a rental's HTTP port."""
    return f"{rental}-{port}"


@dataclass
class RentalRecord:
    id: str
    name: str
    tenant: str
    state: RentalState
    state_reason: str
    spec: dict[str, Any]
    ssh_port: int | None  # None once deleted
    ports: dict[str, int]  # name -> port, stable for the rental's life
    disk_path: str  # the disk image on the node ("" once wiped)
    host_key: str  # the rental's SSH host public key (`TYPE BASE64`)
    node_id: str | None  # where it last ran (its disk is there)
    task_id: str | None  # the task running its environment now, if any
    starts: int  # how many times its environment was started
    requested_at: float  # when the current start was asked for
    ready_s: float | None  # request -> environment running, for the current start
    expires_at: float | None
    created_at: float
    updated_at: float

    @cached_property
    def rental_spec(self) -> RentalSpec:
        return RentalSpec.model_validate(self.spec)

    @property
    def login(self) -> str:
        """The user name the tenant logs in as (the rental's own name)."""
        return self.name
