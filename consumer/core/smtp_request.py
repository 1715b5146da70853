"""SMTP servers named by a request instead of the domain's outboxes: pure functions, no I/O.

The old daemon's clients could give ``smtpHost``, ``smtpPort``, ``smtpUser``,
``smtpPassword``, ``smtpEncryption`` and ``timeout`` with a mail. The daemon gateway turns
them into one SMTP URL (:func:`consumer.core.outboxes.outbox_from_url`'s format) and seals
it whole with ``MAILBUS_SECRET_KEY``; the job carries only that token (``smtp_sealed``), and
the worker that opens it sends through :func:`request_outbox`. Sealed whole, not just the
password: a producer without the key can never make workers connect to a host of its
choosing, nor read or change the credentials.

Fields a request leaves out come from the default server (``MAILBUS_DEFAULT_SMTP_URL``)
when the request names no host or the default's host. A request naming another host
starts afresh (port 587 with STARTTLS, 465 with ``ssl``; no AUTH unless given; the
certificate verified): the default's credentials, and a ``verify=false`` it may carry,
never go to a host the request chose.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from consumer.core.legacy import SMTP_OVERRIDES
from consumer.core.outboxes import Outbox, Security, outbox_from_url
from consumer.core.refusals import InvalidJobError
from consumer.errors import ConfigurationError, GatewayRequestError

# The old daemon's words: "tls" is STARTTLS, "ssl" implicit TLS.
ENCRYPTION: Mapping[str, Security] = {"tls": "starttls", "ssl": "tls"}
# Bounds, so that a sealed URL always fits the job's smtp_sealed (see the tests).
MAX_HOST = 253
MAX_CREDENTIAL_BYTES = 256
MAX_TIMEOUT = 300
_HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# The outbox name a request's server gets in records, events and logs (never a password).
REQUEST_PREFIX = "request:"
# Every request's server under one name in metrics: a label per host would be unbounded.
REQUESTED_LABEL = "request:*"


# The first line of what is sealed: what the token is (the same key encrypts outbox
# passwords, which must never pass for a server).
_SEALED_SERVER = "mailbus smtp server v1"


def sealed_text(domain: str, job_id: str, url: str) -> str:
    """What the gateway seals for the job ``job_id`` of ``domain``: what it is, whose it
    is and the server's URL, so that a token copied into another job is refused, not
    obeyed.
    """
    return "\n".join((_SEALED_SERVER, domain, job_id, url))


def url_sealed_for(text: str, domain: str, job_id: str) -> str:
    """The URL in an opened token, if it was sealed as a server for the job ``job_id`` of
    ``domain``; else :class:`InvalidJobError`.
    """
    parts = text.split("\n", 3)
    if len(parts) != 4 or parts[0] != _SEALED_SERVER:
        raise InvalidJobError("smtp_sealed: not a sealed SMTP server")
    if parts[1:3] != [domain, job_id]:
        raise InvalidJobError("smtp_sealed: sealed for another job's mail")
    return parts[3]


def metrics_label(outbox: str | None) -> str:
    """The metrics label of the outbox named ``outbox`` (none: "")."""
    if outbox is not None and outbox.startswith(REQUEST_PREFIX):
        return REQUESTED_LABEL
    return outbox or ""


def _given(fields: Mapping[str, Any], name: str) -> Any:
    """A field's value; null and "" are as if left out (old clients sent empty settings)."""
    value = fields.get(name)
    return None if value is None or value == "" else value


def _normal(host: str) -> str:
    """``host`` as it compares: lower case, no final dot, an IPv6 address in short form."""
    try:
        return str(ipaddress.IPv6Address(host))
    except ValueError:
        return host.lower().rstrip(".")


def _host(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_HOST:
        raise GatewayRequestError(f"smtpHost: a host name or IP address of at most {MAX_HOST}")
    host = value.strip().removeprefix("[").removesuffix("]")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise GatewayRequestError("smtpHost: not a host name or IP address") from None
    elif not _HOST_NAME.fullmatch(host):
        raise GatewayRequestError("smtpHost: not a host name or IP address")
    return _normal(host)


def _port(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise GatewayRequestError("smtpPort: a port number from 1 to 65535")
    return value


def _credential(value: Any, field: str) -> str | None:
    if value is None:
        return None
    # Never the value in the reason: it may be a password.
    refusal = GatewayRequestError(
        f"{field}: a string of at most {MAX_CREDENTIAL_BYTES} UTF-8 bytes, without control "
        "characters"
    )
    if not isinstance(value, str) or _CONTROL.search(value):
        raise refusal
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate
        raise refusal from None
    if size > MAX_CREDENTIAL_BYTES:
        raise refusal
    return value


def _security(value: Any) -> Security | None:
    if value is None:
        return None
    security = ENCRYPTION.get(value.lower()) if isinstance(value, str) else None
    if security is None:
        raise GatewayRequestError("smtpEncryption: 'tls' (STARTTLS) or 'ssl' (implicit TLS)")
    return security


def _timeout(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_TIMEOUT:
        raise GatewayRequestError(f"timeout: whole seconds from 1 to {MAX_TIMEOUT}")
    return value


def _default(default_url: str | None, host: str | None) -> tuple[Outbox | None, float | None]:
    """The default server and its URL's own timeout, when the request names no host or
    the default's host; else nothing.
    """
    if default_url is None:
        return None, None
    try:
        default = outbox_from_url(default_url)
    except ConfigurationError as exc:
        raise GatewayRequestError(f"MAILBUS_DEFAULT_SMTP_URL is unusable: {exc}") from None
    if host is not None and host != _normal(default.host):
        return None, None
    # Only a timeout the URL sets itself: else the worker's MAILBUS_SMTP_TIMEOUT applies.
    timeouts = parse_qs(urlsplit(default_url).query).get("timeout")
    return default, default.timeout if timeouts else None


def smtp_override_url(
    fields: Mapping[str, Any], *, default_url: str | None, hosts: Collection[str] = ()
) -> str | None:
    """The SMTP URL (:func:`~consumer.core.outboxes.outbox_from_url`'s format) for a daemon
    request's ``smtpHost``, ``smtpPort``, ``smtpUser``, ``smtpPassword``,
    ``smtpEncryption`` and ``timeout``, the fields it leaves out taken from ``default_url``
    as the module says; None when it names no server. A host other than the default's
    must be one of ``hosts`` (``MAILBUS_GATEWAY_SMTP_HOSTS``): a client never makes the
    workers connect where the operator did not say.

    Raises :class:`GatewayRequestError` with a reason the client can read (never a value).
    """
    # ``timeout`` alone names no server: it was accepted and unused before.
    if not any(_given(fields, name) is not None for name in SMTP_OVERRIDES):
        return None
    host = _host(_given(fields, "smtpHost"))
    port = _port(_given(fields, "smtpPort"))
    user = _credential(_given(fields, "smtpUser"), "smtpUser")
    password = _credential(_given(fields, "smtpPassword"), "smtpPassword")
    security = _security(_given(fields, "smtpEncryption"))
    timeout: float | None = _timeout(_given(fields, "timeout"))
    default, default_timeout = _default(default_url, host)
    if default is None and host is not None and host not in {_normal(h) for h in hosts}:
        raise GatewayRequestError(
            "smtpHost: not the default SMTP server nor one of MAILBUS_GATEWAY_SMTP_HOSTS"
        )
    if default is None and host is None:
        raise GatewayRequestError(
            "smtpHost: required with smtpUser, smtpPassword, smtpPort or smtpEncryption, "
            "as no default SMTP server (MAILBUS_DEFAULT_SMTP_URL) is configured"
        )
    if default is not None:
        host = host or default.host
        security = security or default.security
        port = port or default.port
        if user is None:  # a new user never gets the default's password
            user = default.username
            if password is None and default.password is not None:
                password = default.password.get_secret_value()
        timeout = timeout or default_timeout
    assert host is not None  # the request's, or the default's
    security = security or "starttls"
    port = port or (465 if security == "tls" else 587)
    if password is not None and user is None:
        raise GatewayRequestError("smtpPassword: needs smtpUser")
    userinfo = ""
    if user is not None:
        secret = f":{quote(password, safe='')}" if password is not None else ""
        userinfo = f"{quote(user, safe='')}{secret}@"
    where = f"[{host}]" if ":" in host else host
    query = f"security={security}"
    if default is not None and not default.verify_tls:
        query += "&verify=false"
    if timeout is not None:
        query += f"&timeout={timeout:g}"
    return f"smtp://{userinfo}{where}:{port}?{query}"


def request_outbox(url: str, *, timeout: float) -> Outbox:
    """The outbox of a request's SMTP URL, named ``request:HOST:PORT``; ``timeout`` unless
    the URL sets one. Raises :class:`ConfigurationError` for a URL that is not one.
    """
    outbox = outbox_from_url(url, timeout=timeout)
    return replace(outbox, name=f"{REQUEST_PREFIX}{outbox.host}:{outbox.port}")
