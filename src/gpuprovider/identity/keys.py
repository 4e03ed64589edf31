"""Node identity (Ed25519) and API tokens."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gpuprovider.home import write_secret

TOKEN_PREFIX = "gpp_"


def create_node_key(path: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    write_node_key(path, key)
    return key


def write_node_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Write a key as PEM, readable by its owner only; never over an existing file."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_secret(path, pem)


def load_node_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a key that is not Ed25519")
    return key


def public_key_hex(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


def node_id_for(key: Ed25519PrivateKey) -> str:
    """A stable node id derived from the node's public key."""
    return "n-" + hashlib.sha256(bytes.fromhex(public_key_hex(key))).hexdigest()[:12]


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
