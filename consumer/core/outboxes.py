"""Outboxes: the SMTP accounts mail leaves through."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import SecretStr

from consumer.errors import ConfigurationError

Security = Literal["starttls", "tls", "none"]
_SECURITY: tuple[Security, ...] = ("starttls", "tls", "none")
Transport = Literal["smtp", "sendmail"]
DEFAULT_SENDMAIL = "/usr/sbin/sendmail"


@dataclass(frozen=True)
class Outbox:
    """Where and how to hand a message over: an SMTP server, or a local sendmail program
    (``transport="sendmail"``, which uses ``command`` and ``timeout`` only).
    """

    name: str
    host: str
    port: int
    security: Security = "starttls"
    username: str | None = None
    password: SecretStr | None = field(default=None, repr=False)
    verify_tls: bool = True
    timeout: float = 30.0
    # Connections a worker may hold to it (None: MAILBUS_SMTP_POOL_SIZE), and the stored
    # definition's version, so a changed outbox gets a fresh pool.
    max_connections: int | None = None
    version: int = 0
    transport: Transport = "smtp"
    command: str = DEFAULT_SENDMAIL
    # The charset bodies are written in, unless the job names one (None: UTF-8).
    charset: str | None = None
    # The provider whose limits apply (for metrics; the picker reads limits itself).
    provider: str | None = None


def _flag(values: dict[str, list[str]], name: str, default: bool) -> bool:
    if name not in values:
        return default
    raw = values[name][-1].lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"{name} must be true or false, not {raw!r}")


def outbox_from_url(url: str, name: str = "default", timeout: float = 30.0) -> Outbox:
    """Parse ``smtp[s]://user:pass@host:port?security=starttls|tls|none&verify=true``.

    ``smtps://`` means implicit TLS. Without ``security``, port 465 means TLS and any other
    port STARTTLS: mail is encrypted unless the URL says otherwise.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps"):
        raise ConfigurationError("an SMTP URL starts with smtp:// or smtps://")
    if not parts.hostname:
        raise ConfigurationError("the SMTP URL has no host")
    query = parse_qs(parts.query)
    try:
        port = parts.port or (465 if parts.scheme == "smtps" else 587)
    except ValueError:
        raise ConfigurationError("the SMTP URL has an invalid port") from None
    default_security: Security = "tls" if parts.scheme == "smtps" or port == 465 else "starttls"
    wanted = query.get("security", [default_security])[-1]
    security = next((s for s in _SECURITY if s == wanted), None)
    if security is None:
        raise ConfigurationError(f"security must be one of {', '.join(_SECURITY)}")
    password = unquote(parts.password) if parts.password is not None else None
    return Outbox(
        name=name,
        host=parts.hostname,
        port=port,
        security=security,
        username=unquote(parts.username) if parts.username else None,
        password=SecretStr(password) if password is not None else None,
        verify_tls=_flag(query, "verify", default=True),
        timeout=float(query.get("timeout", [timeout])[-1]),
    )
