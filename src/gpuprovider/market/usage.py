"""Usage records: what a lease used in one period, signed with the provider's node key
and chained by hash, so that neither side can change, drop or insert a record unseen.

A record's hash covers its fields and the previous record's hash; the first record
of a lease chains from the lease id. The provider signs the hash; the hub checks the
signature, the sequence and the chain before it counts the record.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Annotated, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field


class UsageError(ValueError):
    """A record that does not belong where it is offered (signature, sequence, chain)."""


class Usage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    lease_id: Annotated[str, Field(max_length=64)]
    seq: Annotated[int, Field(ge=1, le=10**9)]
    start: float  # epoch seconds, the period covered
    end: float
    gpu_seconds: dict[Annotated[str, Field(max_length=64)], Annotated[float, Field(ge=0)]]
    cpu_seconds: Annotated[float, Field(ge=0)] = 0.0
    memory_gib_seconds: Annotated[float, Field(ge=0)] = 0.0
    requests: Annotated[int, Field(ge=0)] = 0  # for services, through the gateway
    prev: Annotated[str, Field(max_length=64)]  # hex hash of the record before
    hash: Annotated[str, Field(max_length=64)] = ""
    signature: Annotated[str, Field(max_length=128)] = ""

    def body(self) -> bytes:
        fields = self.model_dump(exclude={"hash", "signature"})
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> str:
        return hashlib.sha256(self.body()).hexdigest()


def genesis(lease_id: str) -> str:
    """What the first record of a lease chains from."""
    return hashlib.sha256(f"gpp-usage-v1|{lease_id}".encode()).hexdigest()


def seal(key: Ed25519PrivateKey, usage: Usage) -> Usage:
    digest = usage.digest()
    signature = base64.b64encode(key.sign(bytes.fromhex(digest))).decode()
    return usage.model_copy(update={"hash": digest, "signature": signature})


def check_sealed(usage: Usage, provider_key: str) -> None:
    """UsageError unless `usage`'s hash matches its contents and is signed by the key."""
    if usage.digest() != usage.hash:
        raise UsageError(f"record {usage.seq}'s hash does not match its contents")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(provider_key)).verify(
            base64.b64decode(usage.signature, validate=True), bytes.fromhex(usage.hash)
        )
    except (ValueError, binascii.Error, InvalidSignature):
        raise UsageError(f"record {usage.seq} is not signed by the provider's key") from None


def check_next(usage: Usage, provider_key: str, last: Usage | None) -> None:
    """UsageError unless `usage` is the next record after `last`, sealed by the key."""
    if usage.end < usage.start:
        raise UsageError(f"record {usage.seq} ends before it starts")
    expected_seq = last.seq + 1 if last else 1
    if usage.seq != expected_seq:
        raise UsageError(f"record {usage.seq} is out of sequence; the next is {expected_seq}")
    expected_prev = last.hash if last else genesis(usage.lease_id)
    if usage.prev != expected_prev:
        raise UsageError(f"record {usage.seq} does not chain from the record before it")
    if last and usage.start < last.end - 1e-6:
        raise UsageError(f"record {usage.seq} overlaps the period before it")
    check_sealed(usage, provider_key)


def check_chain(records: list[dict[str, Any]], provider_key: str) -> list[Usage]:
    """Every record of a lease, in order, checked one after another."""
    checked: list[Usage] = []
    for raw in records:
        usage = Usage.model_validate(raw)
        check_next(usage, provider_key, checked[-1] if checked else None)
        checked.append(usage)
    return checked
