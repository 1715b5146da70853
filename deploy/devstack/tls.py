"""Throwaway certificates for the private servers: a self-signed one (STARTTLS tests)
and a test certificate authority with a server certificate it signed (AMQPS and
MongoDB TLS tests).
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class ServerCertificate:
    """Paths of a server's certificate, its key, and the certificate of its issuer."""

    cert: Path
    key: Path
    ca: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _server_names(host: str) -> x509.SubjectAlternativeName:
    name: x509.GeneralName
    try:
        name = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:  # a host name
        name = x509.DNSName(host)
    return x509.SubjectAlternativeName([name, x509.DNSName("localhost")])


def _write_certificate(path: Path, certificate: x509.Certificate) -> Path:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def self_signed(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """Write a certificate for ``host`` (and localhost) and its key; return their paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        _builder(_name(host), _name(host), key)
        .add_extension(_server_names(host), critical=False)
        .sign(key, hashes.SHA256())
    )
    return (
        _write_certificate(directory / "server.crt", certificate),
        _write_key(directory / "server.key", key),
    )


def signed_by_test_authority(directory: Path, host: str = "127.0.0.1") -> ServerCertificate:
    """Write a test CA's certificate and a certificate for ``host`` (an address or a name,
    and localhost) that the CA signed, with its key: what a client trusts by naming the
    CA file.
    """
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("mailbus test CA")
    ca = (
        _builder(ca_name, ca_name, ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        _builder(_name(host), ca_name, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_server_names(host), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    return ServerCertificate(
        cert=_write_certificate(directory / "server.crt", certificate),
        key=_write_key(directory / "server.key", key),
        ca=_write_certificate(directory / "ca.crt", ca),
    )


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side TLS context for ``cert`` and ``key``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context
