"""The one settings object: every knob is a ``MAILBUS_*`` environment variable or ``.env`` line."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AfterValidator, BeforeValidator, Field, SecretStr
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 2**20

# URL query keys whose values are secrets: MongoDB's tlsCertificateKeyFilePassword and
# authMechanismProperties (AWS session tokens), and any password, token or secret.
_SECRET_QUERY = re.compile(r"password|token|secret|authmechanismproperties", re.IGNORECASE)


def _path_list(value: Any) -> Any:
    """``MAILBUS_ATTACHMENT_DIRS`` as a JSON list or, like ``PATH``, joined with ``:``."""
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            return json.loads(value)
        return [part for part in value.split(os.pathsep) if part]
    return value


def _comma_list(value: Any) -> Any:
    """A list setting written ``a,b,c`` (or as a JSON list)."""
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            return json.loads(value)
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _lower(value: str | None) -> str | None:
    return value.lower() if value is not None else None


def _https_base(value: str | None) -> str | None:
    """An https base URL without a final slash (checked as links are made of it)."""
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
        raise ValueError("an https URL (https://host[:port][/path]) with no query or fragment")
    if "@" in parts.netloc:  # every mail's link would carry it to its recipient
        raise ValueError("a URL without a user name or password: every recipient sees it")
    if not value.isascii() or any(c.isspace() or c in "<>," for c in value):
        raise ValueError("an ASCII URL without white space, '<', '>' or ','")
    return value.rstrip("/")


# A bounce domain (MAILBUS_BOUNCE_DOMAIN, or a registered domain's own): a DNS name of two
# labels or more, lower case; 190 octets leave a return address (64 of them, and the "@")
# within the 256 of an SMTP path.
BounceDomain = Annotated[
    str,
    Field(max_length=190, pattern=r"^[A-Za-z0-9][A-Za-z0-9-]*(\.[A-Za-z0-9][A-Za-z0-9-]*)+$"),
    AfterValidator(str.lower),
]


class Settings(BaseSettings):
    """Runtime configuration, read from the environment (prefix ``MAILBUS_``) and ``.env``."""

    model_config = SettingsConfigDict(env_prefix="MAILBUS_", env_file=".env", extra="ignore")

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    mongo_url: SecretStr = SecretStr("mongodb://127.0.0.1:27017/")
    mongo_db: str = "mailbus"
    prefix: str = Field("mailbus", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    default_smtp_url: SecretStr | None = None
    secret_key: SecretStr | None = None
    # Multi-tenant installs turn this off: a job (or control request) for a domain that is
    # not registered (`mailbus domain add`) is then refused 'unauthorized'.
    open_domains: bool = True
    # A worker's copy of a job (ladder, retry, dead letter) carries its authorization sealed
    # with MAILBUS_SECRET_KEY, valid this many days past the copy's due time.
    seal_days: float = Field(30.0, gt=0, le=3650)
    # Replies (reply_to) go to RabbitMQ's direct reply-to, or to queues named with this
    # prefix; any other reply_to is not answered.
    reply_queue_prefix: str | None = Field(None, min_length=1)
    # Attachments: local paths must resolve inside ``attachment_dirs``; URLs are fetched
    # (into ``attachment_tmp_dir``, removed at once) and may not reach private addresses.
    attachment_dirs: Annotated[list[Path], NoDecode, BeforeValidator(_path_list)] = []
    attachment_tmp_dir: Path | None = None
    attachment_allow_private: bool = False
    attachment_connect_timeout: float = Field(10.0, gt=0)
    attachment_read_timeout: float = Field(30.0, gt=0)
    # A whole URL fetch, redirects included: a server dripping a byte at a time would
    # otherwise never reach the read timeout.
    attachment_fetch_timeout: float = Field(120.0, gt=0)
    attachment_max_redirects: int = Field(5, ge=0, le=20)
    max_attachment_bytes: int = Field(10 * MiB, ge=1)
    max_message_bytes: int = Field(25 * MiB, ge=1024)
    # Bounds on what one job may make a worker hold: its body (checked before it is
    # decoded), its attachments (counted, and their sizes together held to
    # max_message_bytes, before any is read), URL fetches at once, and the time to gather
    # a whole message's content. A waiting job's record holds its body, and a MongoDB
    # document holds at most 16 MiB: a larger body could never be scheduled.
    max_job_bytes: int = Field(15 * MiB, ge=1024, le=15 * MiB)
    max_attachments: int = Field(100, ge=0)
    attachment_concurrency: int = Field(4, ge=1, le=64)
    compose_timeout: float = Field(180.0, gt=0)
    # Addresses at special-use domains (.test, .localhost), as staging setups with a mail
    # catcher use: refused unless this is on (.example is an ordinary name).
    allow_special_use_domains: bool = False
    # Sandbox mode (a sandboxed domain, or a job's "sandbox": true) is not delivered, or,
    # with this set, only to the outbox of this name: a catch-all such as MailHog.
    sandbox_outbox: str | None = Field(None, min_length=1)
    # Recipients a server calls unknown (5.1.x), or a hard bounce names later, are
    # suppressed for this long; 0: never.
    bounce_suppression_days: float = Field(30.0, ge=0)
    # Bounces and complaints: with a bounce domain, each mail's envelope sender is a return
    # address of its own there (VERP, signed with MAILBUS_SECRET_KEY), and the gateway's
    # --bounces listener (the domain's MX) takes what comes back, up to this size a message.
    # A registered domain with a bounce domain of its own (`mailbus domain bounce-domain`)
    # sends with return addresses there instead.
    bounce_domain: BounceDomain | None = None
    bounce_max_message_bytes: int = Field(MiB, ge=4096, le=16 * MiB)
    # The RabbitMQ management HTTP API (``mailbus status``), e.g. http://rabbit:15672/;
    # without credentials of its own it logs in as the AMQP URL's user.
    management_url: SecretStr | None = None
    # Dead letters a worker publishes expire after this many days (0: kept until purged).
    dead_letter_days: float = Field(30.0, ge=0)
    # Dead-letter alerts: one digest mail at most every ``admin_digest_seconds``.
    admin_email: str | None = None
    admin_from: str | None = None
    admin_digest_seconds: float = Field(900.0, gt=0)
    # The compatibility gateways for the older systems' clients (`mailbus gateway serve`):
    # the old daemon's API password as a hash (`mailbus gateway hash-password`), the domain
    # and default From its mail is sent with, the largest request, how long to wait for a
    # "send now" outcome.
    gateway_password_hash: SecretStr | None = None
    # Without a hash the daemon gateway is open (the old MAILER_AUTH = false): loopback
    # only, unless this says otherwise.
    gateway_open_beyond_loopback: bool = False
    # Domains compare in lower case, as a job's domain is stored.
    gateway_domain: Annotated[str | None, AfterValidator(_lower)] = None
    # The old daemon's template directory (EMAIL_TEMPLATE_DIR): its files are the gateway
    # domain's templates, kept in the template store.
    gateway_template_dir: Path | None = None
    gateway_from: str | None = None
    gateway_max_request_bytes: int = Field(4 * MiB, ge=1024)
    gateway_wait_seconds: float = Field(30.0, gt=0)
    # What a client may cost before it has proved who it is: the connections held at once,
    # the largest request from an address none of whose requests has authenticated yet,
    # seconds to send a request's headers (the daemon: its first bytes) and all of it, and
    # failed authentications (each a slow scrypt) an address may make within the window.
    gateway_max_connections: int = Field(256, ge=1, le=100_000)
    gateway_unauthenticated_bytes: int = Field(64 * 1024, ge=1024)
    gateway_header_timeout: float = Field(10.0, gt=0)
    gateway_read_timeout: float = Field(30.0, gt=0)
    gateway_auth_failures: int = Field(10, ge=1)
    gateway_auth_window: float = Field(60.0, gt=0)
    # The daemon gateway serves TLS only when both are set (the old MAILER_SSL_CERT and
    # MAILER_SSL_KEY): a PEM certificate chain and its unencrypted key.
    gateway_tls_cert: Path | None = None
    gateway_tls_key: Path | None = None
    # Daemon requests may name their own SMTP server (smtpHost, smtpUser, ...): it is sealed
    # into the job with MAILBUS_SECRET_KEY, which the daemon gateway then needs. Off: refused.
    gateway_smtp_overrides: bool = False
    # The SMTP submission gateway: recipients one message may have, and AUTH without TLS
    # on a loopback listener (an application on the same host).
    gateway_smtp_max_recipients: int = Field(100, ge=1, le=1000)
    gateway_smtp_loopback_plain_auth: bool = False
    # The hosts such a request may name besides the default server's (comma-separated).
    gateway_smtp_hosts: Annotated[list[str], NoDecode, BeforeValidator(_comma_list)] = []
    # One-click unsubscribe: the public https URL under which the REST gateway serves
    # /unsubscribe/TOKEN (links are BASE/unsubscribe/TOKEN), and how long a link works.
    unsubscribe_url: Annotated[str | None, AfterValidator(_https_base)] = None
    unsubscribe_days: float = Field(180.0, gt=0, le=3650)
    # Webhooks (`mailbus webhook serve`): deliveries at once, one attempt's time (connect,
    # send, answer), retry backoff, how long an event is retried before it is given up,
    # how long attempts are kept for `mailbus webhook log`, and whether endpoints may be
    # at private addresses (as URL attachments may not).
    webhook_prefetch: int = Field(16, ge=1, le=1000)
    webhook_timeout: float = Field(10.0, gt=0, le=300)
    webhook_retry_base_delay: float = Field(5.0, gt=0)
    webhook_retry_max_delay: float = Field(3600.0, gt=0)
    webhook_max_age: float = Field(3 * 86400.0, gt=0)
    webhook_log_days: float = Field(7.0, gt=0)
    webhook_allow_private: bool = False
    # /metrics, /healthz and /readyz; off unless a port is set (0: any free port).
    http_host: str = "127.0.0.1"
    http_port: int | None = Field(None, ge=0, le=65535)
    # Connections they hold at once (a thread each), and how long each may take to send
    # its request: a silent client must not hold up the liveness probe.
    http_max_connections: int = Field(16, ge=1, le=10_000)
    http_read_timeout: float = Field(5.0, gt=0)
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    prefetch: int = Field(32, ge=1, le=10_000)
    max_attempts: int = Field(8, ge=1, le=100)
    retry_base_delay: float = Field(30.0, gt=0)
    retry_max_delay: float = Field(3600.0, gt=0)
    # A provider answering that it throttles (421, 4.7.x, a reply rule) goes at half its
    # rate for this long after its last such reply; 0: never slowed.
    throttle_seconds: float = Field(300.0, ge=0, le=86400)
    smtp_timeout: float = Field(30.0, gt=0)
    smtp_pool_size: int = Field(8, ge=1, le=1000)
    smtp_idle_seconds: float = Field(30.0, gt=0)
    drain_timeout: float = Field(30.0, ge=0)
    # A job being sent is leased to its worker for this long, the lease renewed while the
    # worker lives: a worker that died has its jobs taken over within about a lease.
    lease_seconds: float = Field(20.0, ge=1)
    delivery_limit: int = Field(5, ge=1)
    retention_days: float = Field(30.0, gt=0)
    store_timeout: float = Field(10.0, gt=0)


def redact_url(url: str) -> str:
    """Return ``url`` with its password, and any query value that is a secret (a key file's
    password, an auth token), replaced: fit for logs and error messages. MongoDB's lists of
    hosts (``h1:27017,h2:27017``) are kept as they are.
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hosts = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{hosts}"
    query = "&".join(
        f"{key}=***" if _SECRET_QUERY.search(key) else f"{key}={value}" if sep else key
        for key, sep, value in (item.partition("=") for item in parts.query.split("&") if item)
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))
