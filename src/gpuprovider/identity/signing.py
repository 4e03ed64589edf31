"""Requests between machines (hub, provider, tenant), signed with Ed25519 over the
method, path (with query), body hash, time and a nonce; checked within a window, with
a replay cache. The headers:

    X-Gpp-Key        the signer's public key (hex)
    X-Gpp-Time       unix seconds
    X-Gpp-Nonce      32 random hex digits, never reused within the window
    X-Gpp-Signature  base64 Ed25519 over SHA-256 of the canonical text
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
import threading
import time
from collections import OrderedDict

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gpuprovider.identity.keys import public_key_hex

WINDOW_S = 30.0
HEADERS = ("x-gpp-key", "x-gpp-time", "x-gpp-nonce", "x-gpp-signature")


class BadSignature(ValueError):
    """The request is not signed as it must be: the message says what is wrong."""


def canonical(method: str, target: str, body: bytes, timestamp: str, nonce: str) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return f"gpp-request-v1\n{method.upper()}\n{target}\n{digest}\n{timestamp}\n{nonce}".encode()


def sign_request(key: Ed25519PrivateKey, method: str, target: str, body: bytes) -> dict[str, str]:
    """Headers that sign this request (`target`: the path with its query string)."""
    timestamp, nonce = str(int(time.time())), secrets.token_hex(16)
    text = canonical(method, target, body, timestamp, nonce)
    signature = key.sign(hashlib.sha256(text).digest())
    return {
        "X-Gpp-Key": public_key_hex(key),
        "X-Gpp-Time": timestamp,
        "X-Gpp-Nonce": nonce,
        "X-Gpp-Signature": base64.b64encode(signature).decode(),
    }


class ReplayCache:
    """Nonces seen within the window, bounded: a full cache refuses new requests
    rather than forget a nonce that could still be replayed."""

    def __init__(self, window_s: float = WINDOW_S, capacity: int = 1_000_000):
        self.window_s, self.capacity = window_s, capacity
        # nonces from before this cache existed are unknown to it: refuse those requests
        # (a restarted server must not accept a replay of what it saw before)
        self.not_before = int(time.time())
        self.seen: OrderedDict[str, float] = OrderedDict()
        self.lock = threading.Lock()
        self.refused = 0  # replays and expired signatures refused, for the figures

    def admit(self, key: str, nonce: str, now: float) -> None:
        with self.lock:
            while self.seen and next(iter(self.seen.values())) < now - 2 * self.window_s:
                self.seen.popitem(last=False)
            slot = f"{key}:{nonce}"
            if slot in self.seen:
                self.refused += 1
                raise BadSignature("replayed request: this nonce was already used")
            if len(self.seen) >= self.capacity:
                raise BadSignature("too many signed requests in the window; retry shortly")
            self.seen[slot] = now


def verify_request(
    headers: dict[str, str],
    method: str,
    target: str,
    body: bytes,
    cache: ReplayCache,
    now: float | None = None,
) -> str:
    """The signer's public key (hex) when the headers sign this request; BadSignature
    saying what is wrong otherwise. Who the key belongs to is the caller's question."""
    lowered = {k.lower(): v for k, v in headers.items()}
    missing = [h for h in HEADERS if not lowered.get(h)]
    if missing:
        raise BadSignature(f"unsigned request: missing {', '.join(missing)}")
    key, timestamp, nonce, signature = (lowered[h] for h in HEADERS)
    now = time.time() if now is None else now
    try:
        skew = abs(now - int(timestamp))
    except ValueError:
        raise BadSignature("X-Gpp-Time must be unix seconds") from None
    if int(timestamp) < cache.not_before:
        cache.refused += 1
        raise BadSignature("signed before this server started; sign the request again")
    if skew > cache.window_s:
        cache.refused += 1
        raise BadSignature(
            f"signature time is {skew:.0f} s from now; allowed {cache.window_s:.0f} s "
            "(check the clocks: NTP)"
        )
    if not (len(nonce) == 32 and all(c in "0123456789abcdef" for c in nonce)):
        raise BadSignature("X-Gpp-Nonce must be 32 lowercase hex digits")
    try:
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(key))
        public.verify(
            base64.b64decode(signature, validate=True),
            hashlib.sha256(canonical(method, target, body, timestamp, nonce)).digest(),
        )
    except (ValueError, binascii.Error, InvalidSignature):
        raise BadSignature("the signature does not verify for this request") from None
    cache.admit(key, nonce, now)
    return key
