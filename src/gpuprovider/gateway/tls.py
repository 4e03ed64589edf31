"""Certificates for the gateway: the names a certificate covers (to refuse one that does
not match the domain at start), and a self-signed wildcard pair for development."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gpuprovider.domain.spec import is_domain

__all__ = ["certificate_names", "check_gateway_tls", "is_domain", "self_signed"]


def certificate_names(path: Path) -> set[str]:
    """DNS names of the certificate in the PEM file (subject alternative names, else
    its common name); ValueError when the file holds no certificate."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a PEM certificate: {exc}") from None
    try:
        alternative = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return set(alternative.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        return {str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)}


def self_signed(domain: str, cert_path: Path, key_path: Path, days: int = 90) -> None:
    """A certificate for `*.<domain>` and `<domain>` (and localhost, 127.0.0.1), signed
    by its own key: for development, never for users."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"*.{domain}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(f"*.{domain}"),
                    x509.DNSName(domain),
                    x509.DNSName("localhost"),
                    x509.DNSName("*.localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def check_gateway_tls(cert: str, key: str, domain: str) -> None:
    """The router's own TLS files, read before it starts: both or neither, each there,
    and a certificate for *.<domain> when a domain is set. ValueError naming the key."""
    if bool(cert) != bool(key):
        raise ValueError("tls_cert and tls_key go together: give both or neither")
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        if path and not Path(path).is_file():
            raise ValueError(f"{name} {path} does not exist")
    if cert and domain:
        names = certificate_names(Path(cert))
        wanted = f"*.{domain}"
        if wanted not in names:
            raise ValueError(
                f"tls_cert {cert} is for {', '.join(sorted(names)) or 'no name'}, not {wanted}"
            )
