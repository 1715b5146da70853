"""mailbus's own exceptions. Each dead-letter cause carries the reason operators see."""

from __future__ import annotations

import os
import re


class MailbusError(Exception):
    """Base of every error mailbus raises on purpose."""


class AttachmentUnavailableError(MailbusError, ConnectionError):
    """A URL attachment could not be fetched now (HTTP error, timeout): worth a retry."""


class ConfigurationError(MailbusError, ValueError):
    """A setting or outbox definition is unusable."""


class ListenError(ConfigurationError):
    """An address a listener was given cannot be listened on: taken by another process,
    a port below 1024 for an unprivileged user, or no such interface.
    """

    def __init__(self, what: str, host: str, port: int, cause: OSError) -> None:
        # asyncio's own message repeats the address: the errno's says what went wrong.
        reason = os.strerror(cause.errno) if cause.errno else str(cause)
        super().__init__(f"{what}: cannot listen on {host}:{port}: {reason}")


class StoreUnavailableError(MailbusError, ConnectionError):
    """MongoDB did not answer in time; no mail is sent without its claim."""


class GatewayRequestError(MailbusError, ValueError):
    """A gateway request that cannot become a job; its text is what the caller is told."""


class ManagementError(MailbusError, ConnectionError):
    """The RabbitMQ management HTTP API could not be read (unreachable, or refused us)."""


class SendmailError(MailbusError):
    """The sendmail program refused the message; ``code`` is its exit status (sysexits)."""

    # EX_TEMPFAIL, EX_OSERR, EX_OSFILE, EX_CANTCREAT, EX_IOERR, EX_PROTOCOL: try again later.
    TRANSIENT = frozenset({71, 72, 73, 74, 75, 76})

    def __init__(self, code: int, output: str) -> None:
        super().__init__(f"sendmail exited with status {code}: {output}".rstrip(": "))
        self.code = code

    @property
    def transient(self) -> bool:
        """Whether the same message may be accepted later (or was killed by a signal)."""
        return self.code in self.TRANSIENT or self.code < 0


# OpenSSL's errors read "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: ...
# (_ssl.c:1006)"; the drivers copy that text into their own errors, beside addresses.
_TLS_FAILURE = re.compile(r"\[SSL: [A-Z0-9_]+\] ([^(\]]+?)\s*(?:\(_ssl\.c:\d+\)|$)")


def connection_failure(exc: BaseException) -> str:
    """``exc`` said safely for logs and operators: its type, and, when a TLS handshake is
    what failed, OpenSSL's reason ("AMQPConnectionError (TLS: certificate verify failed:
    self-signed certificate in certificate chain)"). Never the driver's full text, which
    may carry a URL.
    """
    reason = _tls_reason(exc)
    return type(exc).__name__ + (f" (TLS: {reason})" if reason else "")


def _tls_reason(exc: BaseException) -> str | None:
    seen: BaseException | None = exc
    while seen is not None:
        found = _TLS_FAILURE.search(str(seen))
        if found:
            return found.group(1)
        seen = seen.__cause__ or seen.__context__
    return None
