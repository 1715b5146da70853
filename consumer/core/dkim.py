"""DKIM (RFC 6376) keys and signatures: generating and reading private keys, the DNS
record that publishes a public key, and signing a message's wire bytes with dkimpy. Pure.

Keys are kept as PKCS#8 PEM (RSA or Ed25519, RFC 8463); a :class:`DkimKey` holds one in
the form dkimpy signs with. Signatures use relaxed/relaxed canonicalization and cover the
header fields RFC 6376 recommends (dkimpy's list, plus ``List-Unsubscribe-Post``), with
``From`` signed once more than it appears so that no From can be added after signing.
"""

from __future__ import annotations

import base64
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal, get_args

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from consumer.core.mime import Mail

Algorithm = Literal["rsa", "ed25519"]
ALGORITHMS: tuple[Algorithm, ...] = get_args(Algorithm)
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

# A domain's selectors: a few at a time, during a rotation.
MAX_DKIM_KEYS = 10
RSA_BITS = 2048
# Verifiers ignore signatures of RSA keys under 1024 bits (RFC 8301); past 4096 bits the
# DNS record grows too long for many resolvers.
_RSA_BITS_ALLOWED = range(1024, 4097)
# A PEM private key is a few kilobytes at most (an RSA 4096 key is about 3.3 KB).
MAX_PEM_BYTES = 16 * 1024
# One or more DNS labels: letters, digits and inner hyphens (RFC 6376 §3.1).
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_SELECTOR = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_MAX_SELECTOR_CHARS = 100
# RFC 8058 asks that a one-click unsubscribe header be signed with List-Unsubscribe.
_ALSO_SIGNED = (b"list-unsubscribe-post",)
# A TXT record is made of strings of at most 255 bytes each (RFC 1035 §3.3.14).
_TXT_STRING = 255


def selector_problem(selector: str) -> str | None:
    """Why ``selector`` cannot name a DKIM key, or None when it can."""
    if len(selector) > _MAX_SELECTOR_CHARS or not _SELECTOR.fullmatch(selector):
        return (
            f"a selector is one or more DNS labels (lower-case letters, digits, inner "
            f"'-'), separated by '.', up to {_MAX_SELECTOR_CHARS} characters"
        )
    return None


def generate_key(algorithm: Algorithm) -> bytes:
    """A new private key as PKCS#8 PEM: RSA of :data:`RSA_BITS` bits, or Ed25519."""
    key: PrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        if algorithm == "rsa"
        else ed25519.Ed25519PrivateKey.generate()
    )
    return _pkcs8(key)


def read_private_key(pem: bytes) -> tuple[Algorithm, bytes]:
    """The algorithm of the PEM private key ``pem`` (PKCS#1 or PKCS#8, unencrypted), and
    the key as PKCS#8 PEM; raises ``ValueError`` saying why it cannot sign (the message
    never quotes the key).
    """
    key = _load(pem)
    return _algorithm(key), _pkcs8(key)


def _load(pem: bytes) -> PrivateKey:
    if len(pem) > MAX_PEM_BYTES:
        raise ValueError(f"a PEM private key is at most {MAX_PEM_BYTES} bytes")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ValueError("the private key is encrypted: give it without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm):
        # cryptography's message could quote what it read: never repeated.
        raise ValueError("not a PEM private key (PKCS#1 or PKCS#8)") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size not in _RSA_BITS_ALLOWED:
            raise ValueError(
                f"an RSA key for DKIM has 1024 to 4096 bits ({RSA_BITS} advised), "
                f"not {key.key_size}"
            )
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise ValueError("a DKIM key is RSA or Ed25519, not " + type(key).__name__)


def _algorithm(key: PrivateKey) -> Algorithm:
    return "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ed25519"


def _pkcs8(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_value(pem: bytes) -> str:
    """The DKIM key record's text for the private key ``pem``: ``v=DKIM1; k=...; p=...``
    (RSA: the SubjectPublicKeyInfo; Ed25519: the raw 32-byte key, RFC 8463).
    """
    key = _load(pem)
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        raw = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"v=DKIM1; k={_algorithm(key)}; p={base64.b64encode(raw).decode()}"


def dns_name(selector: str, domain: str) -> str:
    """Where the public key is published: ``selector._domainkey.domain.``"""
    return f"{selector}._domainkey.{domain}."


def dns_record(selector: str, domain: str, value: str) -> str:
    """The TXT record to publish the key record text ``value`` (:func:`public_value`),
    in zone-file form, split into strings of at most 255 characters (a resolver joins
    them).
    """
    strings = " ".join(f'"{value[i : i + _TXT_STRING]}"' for i in range(0, len(value), _TXT_STRING))
    return f"{dns_name(selector, domain)} IN TXT {strings}"


@dataclass(frozen=True)
class DkimKey:
    """A domain's signing key: its ``d=`` domain, its selector, and the private key in
    the form dkimpy reads (PKCS#1 PEM for RSA, the base64 seed for Ed25519). Never
    printed: ``repr`` leaves the private key out.
    """

    domain: str
    selector: str
    algorithm: Algorithm
    secret: bytes = field(repr=False)


def signing_key(domain: str, selector: str, pem: bytes) -> DkimKey:
    """The :class:`DkimKey` of the PEM private key ``pem`` (as :func:`read_private_key`
    reads it), for signing ``domain``'s mail under ``selector``.
    """
    key = _load(pem)
    if isinstance(key, rsa.RSAPrivateKey):
        secret = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    else:
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        secret = base64.b64encode(seed)
    return DkimKey(domain.lower(), selector, _algorithm(key), secret)


def dkim_sign(message: bytes, key: DkimKey) -> bytes:
    """``message`` (RFC 5322 bytes, CRLF line ends, as sent) with a DKIM-Signature
    header field put first, made with ``key`` over those exact bytes. Each call signs
    anew (its ``t=`` is now). Raises ``ValueError`` when the message cannot be signed
    (no From header, say).
    """
    signer = dkim.DKIM(message, linesep=b"\r\n")
    signer.should_sign.update(_ALSO_SIGNED)
    try:
        header: bytes = signer.sign(
            key.selector.encode(),
            key.domain.encode(),
            key.secret,
            signature_algorithm=b"rsa-sha256" if key.algorithm == "rsa" else b"ed25519-sha256",
            canonicalize=(b"relaxed", b"relaxed"),
        )
    except dkim.DKIMException as exc:
        # dkimpy's messages name headers and parameters, never the key's bytes.
        raise ValueError(f"the message cannot be DKIM-signed: {exc}") from None
    return header + message


def sign_mail(mail: Mail, key: DkimKey) -> Mail:
    """``mail`` with its wire bytes signed by ``key`` (:func:`dkim_sign`)."""
    return dataclasses.replace(mail, wire=dkim_sign(mail.wire, key), signed=True)
