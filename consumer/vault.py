"""Secrets kept with ``MAILBUS_SECRET_KEY``: outbox passwords encrypted at rest (Fernet,
rotatable), and signatures on what workers carry from one copy of a job to the next.

The setting holds one or more Fernet keys separated by commas. The first encrypts and
signs; every one decrypts and verifies, so a new key is put first, ``mailbus outbox
rotate-key`` re-encrypts the stored passwords, and the old key can then be dropped.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from consumer.errors import ConfigurationError
from consumer.settings import Settings


def new_key() -> str:
    """A fresh Fernet key, for ``MAILBUS_SECRET_KEY``."""
    return Fernet.generate_key().decode()


class Vault:
    """Encrypts and decrypts secrets with the configured keys."""

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ConfigurationError(
                "MAILBUS_SECRET_KEY is not set: it encrypts outbox passwords "
                "(create one with `mailbus outbox new-key`)"
            )
        try:
            self._fernet = MultiFernet([Fernet(key.encode()) for key in keys])
            self._raw = [base64.urlsafe_b64decode(key) for key in keys]
            # Signing keys derived from, never equal to, the encryption keys.
            self._signing = self.derived_keys("signing")
        except ValueError:
            raise ConfigurationError(
                "MAILBUS_SECRET_KEY must be Fernet keys (32 url-safe base64 bytes), "
                "separated by commas"
            ) from None

    @classmethod
    def from_settings(cls, settings: Settings) -> Vault:
        """The vault of ``MAILBUS_SECRET_KEY``; raises :class:`ConfigurationError` if unset."""
        raw = settings.secret_key.get_secret_value() if settings.secret_key else ""
        return cls([key.strip() for key in raw.split(",") if key.strip()])

    @classmethod
    def optional(cls, settings: Settings) -> Vault | None:
        """The vault of ``MAILBUS_SECRET_KEY``, or None when it is unset (no passwords)."""
        return cls.from_settings(settings) if settings.secret_key is not None else None

    def derived_keys(self, purpose: str) -> list[bytes]:
        """Keys for one ``purpose`` (a word no other use shares), one per configured key
        and in their order: the first signs, every one verifies.
        """
        label = f"mailbus-{purpose}\0".encode()
        return [hashlib.sha256(label + raw).digest() for raw in self._raw]

    def encrypt(self, secret: str) -> str:
        """``secret`` encrypted with the first key."""
        return self._fernet.encrypt(secret.encode()).decode()

    def decrypt(self, token: str) -> str:
        """The secret in ``token``; a token no configured key opens is a configuration error."""
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise ConfigurationError(
                "a stored password cannot be decrypted with MAILBUS_SECRET_KEY "
                "(was the key that encrypted it removed?)"
            ) from None

    def rotate(self, token: str) -> str:
        """``token`` re-encrypted with the first key."""
        try:
            return self._fernet.rotate(token.encode()).decode()
        except InvalidToken:
            raise ConfigurationError(
                "a stored password cannot be decrypted with MAILBUS_SECRET_KEY"
            ) from None

    def sign(self, data: bytes) -> str:
        """An HMAC-SHA256 of ``data`` with the first key, hex."""
        return hmac.new(self._signing[0], data, hashlib.sha256).hexdigest()

    def verify(self, data: bytes, signature: str) -> bool:
        """Whether ``signature`` was made by :meth:`sign` with any configured key."""
        return any(
            hmac.compare_digest(hmac.new(key, data, hashlib.sha256).hexdigest(), signature)
            for key in self._signing
        )
