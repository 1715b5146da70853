"""Return addresses (VERP): each mail's envelope sender names its job, signed, at a
bounce domain, so that a bounce or a complaint coming back is matched to its job and
cannot be forged onto another.

A job's bounce domain is its domain's own, when its registration names one (`mailbus
domain bounce-domain`), else ``MAILBUS_BOUNCE_DOMAIN``. The local part is
``bi-<id>-<mac>`` for an id of up to :data:`DIRECT_ID_BYTES` UTF-8 bytes (carried whole)
and ``bh-<hash>-<mac>`` for a longer one (its record holds the hash as a search key,
:func:`search_key`, so it is found without an index of its own). Both parts are
lower-case base32: MTAs may change the case of a local part. The MAC is an HMAC-SHA256
with a key derived from ``MAILBUS_SECRET_KEY``, cut to 80 bits; a local part is at most
3 + 44 + 1 + 16 = 64 octets (RFC 5321's limit).

At ``MAILBUS_BOUNCE_DOMAIN`` the MAC covers the local part (as it always has: mail sent
before domains had bounce domains of their own still has its bounces read); at any other
bounce domain it covers that domain too. So an address is valid at the one domain it was
made for, and whoever reads one needs no list of the bounce domains: an address that
verifies was made by a worker for that job at that domain, which is the bounce domain of
the job's own domain (or ``MAILBUS_BOUNCE_DOMAIN``). A return address moved to another
tenant's bounce domain is refused like any forgery.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from consumer.errors import ConfigurationError
from consumer.settings import BounceDomain, Settings
from consumer.vault import Vault

# Ids whose base32 fits the local part beside the prefix and the MAC (64 octets in all).
DIRECT_ID_BYTES = 27
_HASH_BYTES = 15  # 120 bits: no two ids of a retention period share one
_MAC_BYTES = 10  # 80 bits: guessing one takes 2^79 tries on average
_MAX_LOCAL = 64
_MAX_DOMAIN = 253  # DNS's limit: a longer one is no bounce domain, and is not hashed
_BOUNCE_DOMAIN: TypeAdapter[str] = TypeAdapter(BounceDomain)
# What the HMAC key is derived for: no other use of MAILBUS_SECRET_KEY shares it.
PURPOSE = "return-path"


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _unb32(text: str) -> bytes | None:
    try:
        return base64.b32decode(text.upper() + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        return None


def _hash(job_id: str) -> str:
    return _b32(hashlib.sha256(job_id.encode("utf-8")).digest()[:_HASH_BYTES])


def carried_whole(job_id: str) -> bool:
    """Whether ``job_id`` is short enough to be carried in its return address as it is."""
    return len(job_id.encode("utf-8")) <= DIRECT_ID_BYTES


def search_key(job_id: str) -> str | None:
    """The key a job record whose id is too long to carry is found by (``search``), or
    None for a short id.
    """
    return None if carried_whole(job_id) else f"ret:{_hash(job_id)}"


@dataclass(frozen=True)
class JobRef:
    """The job a valid return address names: its id, or the search key of a long one."""

    job_id: str | None = None
    key: str | None = None


def checked_bounce_domain(name: str) -> str:
    """``name`` as a bounce domain (lower case); raises :class:`ConfigurationError` when it
    is no domain name of two labels or more, or longer than a return address allows.
    """
    try:
        return _BOUNCE_DOMAIN.validate_python(name)
    except ValidationError:
        raise ConfigurationError(
            f"{name[:100]!r} is no bounce domain: a domain name such as bounces.example.com "
            "(letters, digits and hyphens; 190 characters at most)"
        ) from None


def own_bounce_domain(registration: Mapping[str, Any] | None) -> str | None:
    """The bounce domain a domain's registration names (None for an open domain, or one
    without: its mail then goes with MAILBUS_BOUNCE_DOMAIN's return addresses).
    """
    found = registration.get("bounce_domain") if registration else None
    return found if isinstance(found, str) else None


class ReturnPaths:
    """Makes and reads return addresses: at ``domain`` (MAILBUS_BOUNCE_DOMAIN, None when it
    is unset) and at the bounce domains of registered domains.

    ``keys`` are HMAC keys, the first signing and every one verifying (so that rotating
    ``MAILBUS_SECRET_KEY`` leaves the addresses of mail already sent valid).
    """

    def __init__(self, domain: str | None, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("return addresses need at least one key")
        self.domain = domain.lower() if domain is not None else None
        self.keys = tuple(keys)

    @classmethod
    def configured(cls, settings: Settings) -> ReturnPaths | None:
        """The return addresses ``settings`` sign, or None without MAILBUS_SECRET_KEY (then
        no job has one); raises :class:`ConfigurationError` when MAILBUS_BOUNCE_DOMAIN is
        set without that key.
        """
        if settings.secret_key is None:
            if settings.bounce_domain is None:
                return None
            raise ConfigurationError(
                "MAILBUS_BOUNCE_DOMAIN needs MAILBUS_SECRET_KEY, shared by the workers and the "
                "gateway: it signs each mail's return address, so that bounces cannot be forged"
            )
        return cls(settings.bounce_domain, Vault.from_settings(settings).derived_keys(PURPOSE))

    def _mac(self, key: bytes, signed: str, domain: str) -> str:
        text = signed if domain == self.domain else f"{signed}@{domain}"
        return _b32(hmac.new(key, text.encode("ascii"), hashlib.sha256).digest()[:_MAC_BYTES])

    def address(self, job_id: str, at: str | None = None) -> str:
        """The envelope sender of ``job_id``'s mail, at the bounce domain ``at`` (its
        domain's own) or else at MAILBUS_BOUNCE_DOMAIN; a ValueError without either.
        """
        domain = at.lower() if at is not None else self.domain
        if domain is None:
            raise ValueError("no bounce domain to make a return address at")
        if carried_whole(job_id):
            signed = "bi-" + _b32(job_id.encode("utf-8"))
        else:
            signed = "bh-" + _hash(job_id)
        return f"{signed}-{self._mac(self.keys[0], signed, domain)}@{domain}"

    def read(self, address: str) -> JobRef | None:
        """The job ``address`` names, or None: not in the form :meth:`address` makes, or
        not signed with a configured key for its domain (forged, or moved to another).
        """
        local, at, domain = address.strip().strip("<>").rpartition("@")
        domain = domain.lower().rstrip(".")
        if not at or len(local) > _MAX_LOCAL or len(domain) > _MAX_DOMAIN:
            return None
        # ASCII only: what is signed is, and compare_digest takes no other text.
        if not (local.isascii() and domain.isascii()):
            return None
        parts = local.lower().split("-")
        if len(parts) != 3 or parts[0] not in ("bi", "bh") or not parts[1]:
            return None
        signed = f"{parts[0]}-{parts[1]}"
        if not any(
            hmac.compare_digest(self._mac(key, signed, domain), parts[2]) for key in self.keys
        ):
            return None
        if parts[0] == "bh":
            return JobRef(key=f"ret:{parts[1]}")
        raw = _unb32(parts[1])
        try:
            return JobRef(job_id=raw.decode("utf-8")) if raw else None
        except UnicodeDecodeError:
            return None
