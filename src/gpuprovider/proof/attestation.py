"""NVIDIA Confidential Computing attestation, where the hardware offers it (H100, H200 and
newer in CC mode): the GPU signs a report with a key fused in the chip, certified by
NVIDIA; checked here offline against NVIDIA's pinned Device Identity CA root.

What a report is (NVML `nvmlDeviceGetConfComputeGpuAttestationReport`, the format
nvtrust's local verifier reads): the 37-byte SPDM 1.1 GET_MEASUREMENTS request (version
0x11, code 0xE0, two parameters, the caller's 32-byte nonce, a slot id) followed by the
MEASUREMENTS response (version 0x11, code 0x60, ..., measurement blocks, opaque data,
then the signature): ECDSA P-384 over SHA-384 of request and response without the
signature, 96 bytes (r, s). The signing key is the leaf of the GPU's attestation
certificate chain (`nvmlDeviceGetConfComputeGpuCertificate`), which chains to the root.

The verifier's nonce is derived from the proof it has just checked (challenge id and
the signed commitment), so the report is fresh and names this proof. What this does NOT
check: the measurements against NVIDIA's reference values (RIMs, which need NVIDIA's
service or files fetched from it) and certificate revocation (OCSP, online): an attested
GPU is a genuine NVIDIA GPU in CC mode whose key signed this nonce.

NOT YET RUN ON A CC GPU: no such machine was lent while this was written. The chain and
report checks are tested with certificates and reports the tests make.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

REQUEST_BYTES = 37
SIGNATURE_BYTES = 96  # P-384: r and s, 48 bytes each
SPDM_VERSION = 0x11
GET_MEASUREMENTS, MEASUREMENTS = 0xE0, 0x60
MAX_REPORT_BYTES = 8192  # NVML's buffer
MAX_CHAIN_BYTES = 5120
MAX_CHAIN_CERTS = 8
NONCE_BYTES = 32


class AttestationError(ValueError):
    """A report or certificate chain that does not verify; the message says why."""


@cache
def nvidia_root() -> x509.Certificate:
    """NVIDIA Device Identity CA (P-384, self-signed), as pinned by nvtrust's verifier."""
    pem = resources.files(__package__).joinpath("nvidia_device_root.pem").read_bytes()
    return x509.load_pem_x509_certificate(pem)


def nonce_for(challenge_id: str, commitment_digest: bytes) -> bytes:
    """The report's nonce: this proof's challenge and commitment, so the report is fresh
    and cannot be reused for another proof."""
    return hashlib.sha256(
        b"gpuprovider-attest-v1" + bytes.fromhex(challenge_id) + commitment_digest
    ).digest()


@dataclass(frozen=True)
class Report:
    nonce: bytes  # from the SPDM request
    signed: bytes  # request and response, without the signature
    signature: bytes  # DER, for cryptography's ECDSA

    @classmethod
    def parse(cls, raw: bytes) -> Report:
        if not REQUEST_BYTES + 8 + SIGNATURE_BYTES <= len(raw) <= MAX_REPORT_BYTES:
            raise AttestationError(f"an attestation report of {len(raw)} bytes is malformed")
        request, response = raw[:REQUEST_BYTES], raw[REQUEST_BYTES:]
        if request[0] != SPDM_VERSION or request[1] != GET_MEASUREMENTS:
            raise AttestationError("the report does not start with an SPDM 1.1 GET_MEASUREMENTS")
        if response[0] != SPDM_VERSION or response[1] != MEASUREMENTS:
            raise AttestationError("the report's response is not SPDM 1.1 MEASUREMENTS")
        sig = raw[-SIGNATURE_BYTES:]
        half = SIGNATURE_BYTES // 2
        r, s = int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big")
        return cls(request[4 : 4 + NONCE_BYTES], raw[:-SIGNATURE_BYTES], encode_dss_signature(r, s))


def verify_chain(
    chain_pem: bytes, root: x509.Certificate, now: datetime | None = None
) -> x509.Certificate:
    """The leaf of `chain_pem` (leaf first) when every certificate is signed by the next,
    all are valid now, every issuer is a CA, and the last is the pinned root or signed by
    it; AttestationError otherwise."""
    if len(chain_pem) > MAX_CHAIN_BYTES:
        raise AttestationError(f"a certificate chain of {len(chain_pem)} bytes is too long")
    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise AttestationError("the certificate chain is not PEM certificates") from None
    if not 1 <= len(certs) <= MAX_CHAIN_CERTS:
        raise AttestationError(f"a chain of {len(certs)} certificates; 1 to {MAX_CHAIN_CERTS}")
    if certs[-1] != root:
        certs.append(root)  # chains may stop below the root; it is pinned here anyway
    now = now or datetime.now(UTC)
    for cert, issuer in itertools.pairwise(certs):
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise AttestationError(
                f"{cert.subject.rfc4514_string()} is not signed by "
                f"{issuer.subject.rfc4514_string()}: not NVIDIA's chain"
            ) from None
        try:
            ca = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        if not ca:
            raise AttestationError(f"{issuer.subject.rfc4514_string()} is not a CA")
    for cert in certs:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise AttestationError(f"{cert.subject.rfc4514_string()} is not valid now")
    return certs[0]


def verify_report(
    report: bytes,
    chain_pem: bytes,
    nonce: bytes,
    root: x509.Certificate | None = None,
    now: datetime | None = None,
) -> x509.Certificate:
    """The GPU's leaf certificate when `report` answers `nonce`, signed by the leaf of a
    chain to `root` (NVIDIA's by default); AttestationError otherwise."""
    parsed = Report.parse(report)
    if parsed.nonce != nonce:
        raise AttestationError("the report answers another nonce (replayed or for another proof)")
    leaf = verify_chain(chain_pem, root or nvidia_root(), now)
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise AttestationError("the GPU's attestation key is not ECDSA P-384")
    try:
        key.verify(parsed.signature, parsed.signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise AttestationError(
            "the report's signature does not verify under the GPU's key"
        ) from None
    return leaf


# -- reading it on the provider (NVML) ---------------------------------------------------


class NotAvailable(RuntimeError):
    """This machine or GPU offers no CC attestation; the message says why."""


def read(nvml: Any, index: int, nonce: bytes) -> tuple[bytes, bytes]:
    """(report, attestation certificate chain PEM) of GPU `index` for `nonce`, through
    NVML (`nvml` is pynvml, initialised). NotAvailable where CC is off or unsupported."""
    try:
        state = nvml.nvmlSystemGetConfComputeState()
    except Exception as exc:  # NVML raises its own error per driver; any means "no CC"
        raise NotAvailable(f"the driver offers no confidential computing ({exc})") from None
    if not state.ccFeature:
        raise NotAvailable("confidential computing is off on this machine (CC mode disabled)")
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        made = nvml.nvmlDeviceGetConfComputeGpuAttestationReport(handle, nonce)
        certs = nvml.nvmlDeviceGetConfComputeGpuCertificate(handle)
    except Exception as exc:
        raise NotAvailable(f"GPU {index} gave no attestation report ({exc})") from None
    report = bytes(made.attestationReport[: made.attestationReportSize])
    chain = bytes(certs.attestationCertChain[: certs.attestationCertChainSize])
    return report, chain
