"""The node key, backed up under a passphrase: scrypt derives an AES-256-GCM key; the
file says which node it is (id and public key) in the clear, and GCM authenticates
those fields with the key, so that neither can be changed unnoticed.

A market that staked on this node (DeepBrainChain takes half the stake of a node whose
key is lost) knows it by that key: the backup is what brings the node back elsewhere.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from gpuprovider.identity.keys import load_node_key, node_id_for, public_key_hex, write_node_key

FORMAT = "gpuprovider-node-key-backup"
VERSION = 1
MIN_PASSPHRASE = 12  # characters
# scrypt's cost: 2**17 x 8 x 128 bytes = 128 MiB and about half a second to try one
# passphrase. A file asking for more than the most below is refused, not obeyed.
COST = {"n": 1 << 17, "r": 8, "p": 1}
MOST = {"n": 1 << 20, "r": 16, "p": 4}
MAX_FILE_BYTES = 64 * 1024


class BackupError(ValueError):
    """The backup cannot be made or used; the message says why."""


@dataclass(frozen=True)
class Identity:
    node_id: str
    public_key: str

    @classmethod
    def of(cls, key: Ed25519PrivateKey) -> Identity:
        return cls(node_id_for(key), public_key_hex(key))


def _kdf(passphrase: str, salt: bytes, cost: dict[str, int]) -> bytes:
    return Scrypt(salt=salt, length=32, **cost).derive(passphrase.encode())


def _header(identity: Identity, cost: dict[str, int], salt: bytes, nonce: bytes) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "node_id": identity.node_id,
        "public_key": identity.public_key,
        "kdf": {"name": "scrypt", **cost, "salt": base64.b64encode(salt).decode()},
        "cipher": {"name": "AES-256-GCM", "nonce": base64.b64encode(nonce).decode()},
    }


def _associated(header: dict) -> bytes:
    """What GCM authenticates besides the key: every field of the header."""
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def backup(key: Ed25519PrivateKey, passphrase: str, cost: dict[str, int] = COST) -> bytes:
    """The backup file's bytes for `key`."""
    if len(passphrase) < MIN_PASSPHRASE:
        raise BackupError(f"the passphrase must have at least {MIN_PASSPHRASE} characters")
    salt, nonce = os.urandom(16), os.urandom(12)
    header = _header(Identity.of(key), cost, salt, nonce)
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    sealed = AESGCM(_kdf(passphrase, salt, cost)).encrypt(nonce, raw, _associated(header))
    body = {**header, "ciphertext": base64.b64encode(sealed).decode()}
    return (json.dumps(body, indent=2) + "\n").encode()


def read_identity(data: bytes) -> tuple[Identity, dict]:
    """Which node a backup says it holds (unchecked until it is opened), and its fields."""
    if len(data) > MAX_FILE_BYTES:
        raise BackupError(f"it is larger than {MAX_FILE_BYTES} bytes: not a node key backup")
    try:
        body = json.loads(data)
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise BackupError("it is not a gpuprovider node key backup")
        if body.get("version") != VERSION:
            raise BackupError(f"it is version {body.get('version')!r}; this gpuprovider reads 1")
        return Identity(str(body["node_id"]), str(body["public_key"])), body
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        if isinstance(exc, BackupError):
            raise
        raise BackupError(f"it is not a node key backup ({type(exc).__name__})") from None


def open_backup(data: bytes, passphrase: str) -> Ed25519PrivateKey:
    """The key a backup holds; BackupError when the passphrase is wrong or the file was
    changed (GCM cannot tell the two apart)."""
    identity, body = read_identity(data)
    try:
        kdf, cipher = body["kdf"], body["cipher"]
        cost = {name: kdf[name] for name in ("n", "r", "p")}
        if kdf["name"] != "scrypt" or cipher["name"] != "AES-256-GCM":
            raise BackupError(f"it uses {kdf['name']}/{cipher['name']}; expected scrypt/AES")
        if not all(type(v) is int and 1 <= v <= MOST[k] for k, v in cost.items()):
            raise BackupError(f"its scrypt cost {cost} is beyond what is allowed ({MOST})")
        salt = base64.b64decode(kdf["salt"], validate=True)
        nonce = base64.b64decode(cipher["nonce"], validate=True)
        sealed = base64.b64decode(body["ciphertext"], validate=True)
        header = _header(identity, cost, salt, nonce)
        derived = _kdf(passphrase, salt, cost)
    except BackupError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"it is damaged ({type(exc).__name__}: {exc})") from None
    try:
        raw = AESGCM(derived).decrypt(nonce, sealed, _associated(header))
    except (InvalidTag, ValueError):
        raise BackupError("wrong passphrase, or the file was changed") from None
    key = Ed25519PrivateKey.from_private_bytes(raw)
    if Identity.of(key) != identity:  # cannot happen unless the writer lied
        raise BackupError("the key inside is not the node the file names")
    return key


def restore(
    data: bytes, passphrase: str, key_path: Path, replace: bool = False
) -> tuple[Identity, Path | None]:
    """Put a backed-up key at `key_path`. A different key there is refused, or with
    `replace` moved aside (never deleted): the node it was, and where it went."""
    key = open_backup(data, passphrase)
    identity = Identity.of(key)
    if not key_path.exists():
        write_node_key(key_path, key)
        return identity, None
    present = Identity.of(load_node_key(key_path))
    if present == identity:
        return identity, None
    if not replace:
        raise BackupError(
            f"{key_path} holds another node's key ({present.node_id}); the backup is "
            f"{identity.node_id}. Nothing was changed. To make this node "
            f"{identity.node_id}, stop the daemon and run again with --replace (the "
            "present key is kept beside it, never deleted)"
        )
    aside = key_path.with_name(f"{key_path.name}.{present.node_id}")
    if not aside.exists():  # kept first: if anything below fails, both keys remain
        os.link(key_path, aside)
    elif aside.read_bytes() != key_path.read_bytes():
        raise BackupError(f"{aside} exists and differs from {key_path}; move it away first")
    tmp = key_path.with_name(key_path.name + ".restoring")
    tmp.unlink(missing_ok=True)
    write_node_key(tmp, key)
    os.replace(tmp, key_path)
    return identity, aside
