"""The daemon gateway's TLS (the old daemon's ``MAILER_SSL_CERT`` and ``MAILER_SSL_KEY``):
one server context, loaded at start, so that a certificate or key that cannot be used
stops the gateway before it listens instead of failing every client.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from consumer.errors import ConfigurationError
from consumer.settings import Settings

# A PEM certificate chain or key is a few kilobytes: a larger file is not one.
_MAX_PEM_BYTES = 2**20


def _check_readable(path: Path, variable: str) -> None:
    try:
        with path.open("rb") as file:
            size = len(file.read(_MAX_PEM_BYTES + 1))
    except OSError as exc:
        raise ConfigurationError(f"{variable}: cannot read {path}: {exc.strerror or exc}") from None
    if size > _MAX_PEM_BYTES:
        raise ConfigurationError(f"{variable}: {path} is over {_MAX_PEM_BYTES} bytes, not PEM")


def _encrypted(key: Path) -> bytes:
    # Without a callback OpenSSL would ask for an encrypted key's passphrase on the terminal.
    raise ConfigurationError(f"MAILBUS_GATEWAY_TLS_KEY: {key} is encrypted; give it unencrypted")


def daemon_context(settings: Settings) -> ssl.SSLContext | None:
    """The daemon gateway's server TLS context (TLS 1.2 at least), or None when
    ``MAILBUS_GATEWAY_TLS_CERT`` and ``MAILBUS_GATEWAY_TLS_KEY`` are not both set.
    A file that cannot be read or used is a ConfigurationError naming it.
    """
    cert, key = settings.gateway_tls_cert, settings.gateway_tls_key
    if cert is None or key is None:
        return None
    _check_readable(cert, "MAILBUS_GATEWAY_TLS_CERT")
    _check_readable(key, "MAILBUS_GATEWAY_TLS_KEY")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key, password=lambda: _encrypted(key))
    except ssl.SSLError as exc:
        raise ConfigurationError(
            f"MAILBUS_GATEWAY_TLS_CERT ({cert}) and MAILBUS_GATEWAY_TLS_KEY ({key}) are not "
            f"a PEM certificate chain and its private key: {exc.reason or exc}"
        ) from None
    return context
