"""NVIDIA CC attestation, checked offline: reports and certificate chains the tests make
(no CC GPU has run this), against a pinned root; and the hub's per-order requirement."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from sqlalchemy import update

from gpuprovider.hub import store as hub_tables
from gpuprovider.hub.hub import Hub, HubError, HubSettings
from gpuprovider.hub.store import HubStore
from gpuprovider.identity.keys import public_key_hex
from gpuprovider.proof import attestation as A
from gpuprovider.proof.prover import Commitment
from gpuprovider.proof.remote import AttestMode, RemoteVerifier, cpu_params
from gpuprovider.proof.verifier import Verdict, new_challenge

NOW = datetime.now(UTC)


def cert(name, key, issuer=None, issuer_key=None, ca=True, days=(-1, 365)):
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    built = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW + timedelta(days=days[0]))
        .not_valid_after(NOW + timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    return built.sign(issuer_key or key, hashes.SHA384())


def pem(*certs) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


P384 = ec.SECP384R1()
ROOT_KEY, MID_KEY, LEAF_KEY = (ec.generate_private_key(P384) for _ in range(3))
ROOT = cert("Test Device Identity CA", ROOT_KEY)
MID = cert("Test GPU CA", MID_KEY, ROOT, ROOT_KEY)
LEAF = cert("Test GH100 AK", LEAF_KEY, MID, MID_KEY, ca=False)
CHAIN = pem(LEAF, MID, ROOT)


def report(nonce: bytes, key=LEAF_KEY, blocks: bytes = b"\x01" * 80) -> bytes:
    """An SPDM 1.1 GET_MEASUREMENTS request and a MEASUREMENTS response signed by `key`."""
    request = bytes([0x11, 0xE0, 0x01, 0xFF]) + nonce + b"\x00"
    response = bytes([0x11, 0x60, 0x00, 0x00]) + blocks + b"\x00" * 32 + b"\x00\x00"
    der = key.sign(request + response, ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(der)
    return request + response + r.to_bytes(48, "big") + s.to_bytes(48, "big")


NONCE = A.nonce_for("ab" * 16, hashlib.sha256(b"commitment").digest())


def test_a_report_signed_by_a_chain_to_the_pinned_root_verifies():
    leaf = A.verify_report(report(NONCE), CHAIN, NONCE, ROOT)
    assert leaf == LEAF
    # a chain that stops below the root is completed with the pinned root
    assert A.verify_report(report(NONCE), pem(LEAF, MID), NONCE, ROOT) == LEAF


@pytest.mark.parametrize(
    "make,text",
    [
        (lambda: (report(b"\x00" * 32), CHAIN), "another nonce"),
        (lambda: (report(NONCE)[:-1] + b"\x00", CHAIN), "signature does not verify"),
        (lambda: (report(NONCE, key=MID_KEY), CHAIN), "signature does not verify"),
        (lambda: (b"\x11\xe0" + b"\x00" * 40, CHAIN), "malformed"),
        (lambda: (b"\x10" + report(NONCE)[1:], CHAIN), "GET_MEASUREMENTS"),
        (lambda: (report(NONCE), b"not a certificate"), "not PEM"),
        (lambda: (report(NONCE), b"-" * 6000), "too long"),
    ],
    ids=["stale-nonce", "tampered", "wrong-key", "short", "not-spdm", "garbage-chain", "huge"],
)
def test_a_report_that_does_not_verify_says_why(make, text):
    raw, chain = make()
    with pytest.raises(A.AttestationError, match=text):
        A.verify_report(raw, chain, NONCE, ROOT)


def test_only_nvidias_root_or_the_pinned_one_anchors_a_chain():
    # a chain the provider made itself, however well formed, does not reach NVIDIA's root
    with pytest.raises(A.AttestationError, match="not NVIDIA's chain"):
        A.verify_report(report(NONCE), CHAIN, NONCE)  # the default: NVIDIA's pinned root
    other_key = ec.generate_private_key(P384)
    other = cert("Test Device Identity CA", other_key)  # same name, another key
    with pytest.raises(A.AttestationError, match="not NVIDIA's chain"):
        A.verify_report(report(NONCE), CHAIN, NONCE, other)
    assert A.nvidia_root().subject.rfc4514_string() == "O=NVIDIA,CN=NVIDIA Device Identity CA"


def test_an_expired_certificate_or_a_leaf_posing_as_a_ca_is_refused():
    old = cert("Test GH100 AK", LEAF_KEY, MID, MID_KEY, ca=False, days=(-30, -1))
    with pytest.raises(A.AttestationError, match="not valid now"):
        A.verify_report(report(NONCE), pem(old, MID, ROOT), NONCE, ROOT)
    fake_mid = cert("Test GPU CA", MID_KEY, ROOT, ROOT_KEY, ca=False)
    with pytest.raises(A.AttestationError, match="is not a CA"):
        A.verify_report(report(NONCE), pem(LEAF, fake_mid, ROOT), NONCE, ROOT)


def test_a_machine_without_confidential_computing_says_so():
    off = SimpleNamespace(nvmlSystemGetConfComputeState=lambda: SimpleNamespace(ccFeature=0))
    with pytest.raises(A.NotAvailable, match="CC mode disabled"):
        A.read(off, 0, NONCE)

    def no_cc():
        raise RuntimeError("Not Supported")

    with pytest.raises(A.NotAvailable, match="no confidential computing"):
        A.read(SimpleNamespace(nvmlSystemGetConfComputeState=no_cc), 0, NONCE)


def test_an_order_may_require_attested_gpus(tmp_path):
    hub = Hub(
        HubStore(f"sqlite:///{tmp_path / 'hub.db'}"), HubSettings(), Ed25519PrivateKey.generate()
    )
    provider, tenant = (public_key_hex(Ed25519PrivateKey.generate()) for _ in range(2))
    hub.register(
        provider, "provider", {"name": "p", "api_url": "http://127.0.0.1:9", "verify_token": "t"}
    )

    def admitted(attested: bool) -> None:
        with hub.store.tx() as conn:  # admitted by hand, with what admission records
            conn.execute(
                update(hub_tables.participants)
                .where(hub_tables.participants.c.key == provider)
                .values(
                    status="admitted",
                    gpus=[{"uuid": "GPU-0", "model": "h100-80gb-sxm", "attested": attested}],
                    last_heartbeat=time.time() + 86400,
                )
            )

    hub.register(tenant, "tenant", {"name": "alice"})
    hub.deposit({"tenant": "alice", "amount": 5_000_000})
    job = {
        "resources": {"gpus": 1, "gpu_model": "h100", "cpus": 0, "memory_gb": 0, "attested": True},
        "max_price_per_hour": 2_000_000,
        "duration_s": 600,
        "payload": {"name": "x", "command": ["true"]},
    }
    admitted(False)
    with pytest.raises(HubError, match="0 proven attested GPU"):
        hub.post_order(tenant, {"order": job, "deposit": 1_000_000})
    plain = {**job, "resources": {**job["resources"], "attested": False}}
    assert hub.post_order(tenant, {"order": plain, "deposit": 1_000_000})["id"]
    admitted(True)
    assert hub.post_order(tenant, {"order": job, "deposit": 1_000_000})["id"]


class CcProvider(BaseHTTPRequestHandler):
    """Answers attestation requests: GPU-cc with a report for the nonce asked, GPU-plain
    with the provider's 409 (no CC), GPU-replay with a report for another nonce."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        uuid = self.path.split("/")[4]
        nonce = bytes.fromhex(body["nonce"]) if uuid != "GPU-replay" else NONCE
        if uuid == "GPU-plain":
            status, answer = 409, {"error": "GPU GPU-plain offers no attestation: CC mode off"}
        else:
            status = 200
            answer = {
                "report": base64.b64encode(report(nonce)).decode(),
                "cert_chain": base64.b64encode(CHAIN).decode(),
            }
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_the_verifier_records_or_requires_an_attestation_bound_to_the_proof():
    server = ThreadingHTTPServer(("127.0.0.1", 0), CcProvider)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    key = Ed25519PrivateKey.generate()
    challenge = new_challenge("GPU-cc", "h100-80gb-sxm", public_key_hex(key), cpu_params(2 << 20))
    commitment = Commitment(challenge.id, "11" * 32, b"\x00" * 32 * (challenge.params.steps + 1))
    try:
        for mode in (AttestMode.TRY, AttestMode.REQUIRE):
            verifier = RemoteVerifier(
                url, None, public_key_hex(key), key, attest=mode, attestation_root=ROOT
            )
            found = {}
            for uuid in ("GPU-cc", "GPU-plain", "GPU-replay"):
                verdict = Verdict(True, "passed", {})
                verifier._attest(uuid, challenge, commitment, False, verdict)
                found[uuid] = verdict
            assert found["GPU-cc"].passed and found["GPU-cc"].figures["attestation"] == (
                "verified: CN=Test GH100 AK"
            )
            plain, replay = found["GPU-plain"], found["GPU-replay"]
            assert (
                "unavailable" in plain.figures["attestation"]
                and "CC mode off" in plain.figures["attestation"]
            )
            assert replay.figures["attestation"].startswith(
                "failed: the report answers another nonce"
            )
            required = mode is AttestMode.REQUIRE
            assert plain.passed is not required and replay.passed is not required
            if required:
                assert "attestation is required" in plain.reason
        # a simulated GPU is never asked: it has no hardware to attest
        verdict = Verdict(True, "passed", {})
        verifier._attest("GPU-cc", challenge, commitment, True, verdict)
        assert "simulated" in verdict.figures["attestation"] and not verdict.passed
    finally:
        server.shutdown()
        server.server_close()
