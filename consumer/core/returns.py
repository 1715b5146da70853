"""Return addresses (VERP): each mail's envelope sender names its job, signed, at the
bounce domain, so that a bounce or a complaint coming back is matched to its job and
cannot be forged onto another.

The local part is ``bi-<id>-<mac>`` for an id of up to :data:`DIRECT_ID_BYTES` UTF-8
bytes (carried whole) and ``bh-<hash>-<mac>`` for a longer one (its record holds the hash
as a search key, :func:`search_key`, so it is found without an index of its own). Both
parts are lower-case base32: MTAs may change the case of a local part. The MAC is an
HMAC-SHA256 with a key derived from ``MAILBUS_SECRET_KEY``, cut to 80 bits; a local part
is at most 3 + 44 + 1 + 16 = 64 octets (RFC 5321's limit).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from consumer.errors import ConfigurationError
from consumer.settings import Settings
from consumer.vault import Vault

# Ids whose base32 fits the local part beside the prefix and the MAC (64 octets in all).
DIRECT_ID_BYTES = 27
_HASH_BYTES = 15  # 120 bits: no two ids of a retention period share one
_MAC_BYTES = 10  # 80 bits: guessing one takes 2^79 tries on average
_MAX_LOCAL = 64
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


class ReturnPaths:
    """Makes and reads the return addresses of one bounce domain.

    ``keys`` are HMAC keys, the first signing and every one verifying (so that rotating
    ``MAILBUS_SECRET_KEY`` leaves the addresses of mail already sent valid).
    """

    def __init__(self, domain: str, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("return addresses need at least one key")
        self.domain = domain.lower()
        self.keys = tuple(keys)

    @classmethod
    def configured(cls, settings: Settings) -> ReturnPaths | None:
        """The return addresses of MAILBUS_BOUNCE_DOMAIN, or None without one; raises
        :class:`ConfigurationError` when MAILBUS_SECRET_KEY, which signs them, is unset.
        """
        if settings.bounce_domain is None:
            return None
        if settings.secret_key is None:
            raise ConfigurationError(
                "MAILBUS_BOUNCE_DOMAIN needs MAILBUS_SECRET_KEY, shared by the workers and the "
                "gateway: it signs each mail's return address, so that bounces cannot be forged"
            )
        return cls(settings.bounce_domain, Vault.from_settings(settings).derived_keys(PURPOSE))

    def _mac(self, key: bytes, text: str) -> str:
        return _b32(hmac.new(key, text.encode("ascii"), hashlib.sha256).digest()[:_MAC_BYTES])

    def address(self, job_id: str) -> str:
        """The envelope sender of ``job_id``'s mail."""
        if carried_whole(job_id):
            signed = "bi-" + _b32(job_id.encode("utf-8"))
        else:
            signed = "bh-" + _hash(job_id)
        return f"{signed}-{self._mac(self.keys[0], signed)}@{self.domain}"

    def read(self, address: str) -> JobRef | None:
        """The job ``address`` names, or None: not at the bounce domain, not in the form
        :meth:`address` makes, or signed with no configured key (forged).
        """
        local, at, domain = address.strip().strip("<>").rpartition("@")
        if not at or domain.lower().rstrip(".") != self.domain or len(local) > _MAX_LOCAL:
            return None
        parts = local.lower().split("-")
        if len(parts) != 3 or parts[0] not in ("bi", "bh") or not parts[1]:
            return None
        signed = f"{parts[0]}-{parts[1]}"
        if not signed.isascii() or not any(
            hmac.compare_digest(self._mac(key, signed), parts[2]) for key in self.keys
        ):
            return None
        if parts[0] == "bh":
            return JobRef(key=f"ret:{parts[1]}")
        raw = _unb32(parts[1])
        try:
            return JobRef(job_id=raw.decode("utf-8")) if raw else None
        except UnicodeDecodeError:
            return None
