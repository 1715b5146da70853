"""The SMTP submission gateway: what every application framework already speaks. Each
message a client submits (aiosmtpd) becomes a raw v1 job, answered ``250`` only once the
broker has confirmed it, ``451`` while the broker or the domain registry cannot be reached,
so that nothing accepted is lost and nothing refused is sent.

A client authenticates (AUTH PLAIN or LOGIN, over TLS unless loopback is allowed) as a
registered domain: user ``DOMAIN`` with the domain key or one of its API keys, or
``NAME@DOMAIN`` with the API key named NAME. Its jobs carry no key: the gateway seals the
domain it vouches for onto them, as for REST API keys.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import ssl
import warnings
from base64 import b64decode
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session

from consumer.clock import utcnow
from consumer.core import legacy
from consumer.core.submission import raw_job, read_steering, split_steering
from consumer.errors import GatewayRequestError, StoreUnavailableError
from consumer.logging import get_logger
from consumer.service.authorization import Authority, api_key_matches
from consumer.settings import Settings

if TYPE_CHECKING:
    from consumer.service.gateway import Gateway

log = get_logger(__name__)

# Replies, with their enhanced status codes (RFC 3463).
AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_REFUSED = "535 5.7.8 Authentication credentials invalid"
AUTH_THROTTLED = "454 4.7.0 Too many failed authentications, try again later"
AUTH_UNAVAILABLE = "454 4.7.0 Temporary authentication failure, try again later"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
UNAVAILABLE = "451 4.3.0 Mail service unavailable, try again later"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
BUSY = "421 4.7.0 Too many connections, try again later"
# Room a raw job's JSON takes beside its message (envelope, tags, id, times), and the
# headers a worker may add to it (Message-ID, Date, a DKIM signature).
_JOB_OVERHEAD = 256 * 1024
_ADDED_HEADERS = 4096
# A refusal's reason on one reply line: bounded, one line.
_REASON_CHARS = 300


def _one_line(reason: str) -> str:
    return " ".join(reason.split())[:_REASON_CHARS]


@dataclass(frozen=True)
class Submitter:
    """Who a session authenticated as: the registered domain whose mail it may submit."""

    domain: str


def _login(login: bytes) -> tuple[str | None, str] | None:
    """``NAME@DOMAIN`` or ``DOMAIN`` as (key name or None, lower-case domain)."""
    try:
        text = login.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return None
    name, at, domain = text.rpartition("@")
    if not domain or len(text) > 320 or (at and not name):
        return None
    return (name or None), domain


def take_sender(envelope: Envelope, address: str, mail_options: list[str]) -> str:
    """Keep ``MAIL FROM``'s address (``<>`` included) and options on ``envelope``: the
    answer to it, ``553`` past the longest address there is.
    """
    if len(address) > 320:
        return "553 5.1.7 Sender address too long"
    envelope.mail_from = address
    envelope.mail_options.extend(mail_options)
    return "250 2.1.0 OK"


class SubmissionHandler:
    """The aiosmtpd handler: authentication, envelope checks and the job of each message."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        self.max_recipients = gateway.settings.gateway_smtp_max_recipients

    # AUTH: asynchronous hooks, so that checking a hash never blocks the event loop.

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        """RFC 4616: ``authzid NUL authcid NUL passwd``, given at once or after a 334."""
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = b64decode(args[1], validate=True)
            except binascii.Error:
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        assert isinstance(blob, bytes)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await server.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        return await self._authenticate(server, parts[1], parts[2])

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        """The LOGIN mechanism: the user name, then the password, each after a 334."""
        if len(args) == 2:
            try:
                login: bytes | Any = b64decode(args[1], validate=True)
            except binascii.Error:
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        else:
            login = await server.challenge_auth("User Name")
        if login is MISSING:
            return AuthResult(success=False, handled=True)
        password = await server.challenge_auth("Password")
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        assert isinstance(login, bytes)
        assert isinstance(password, bytes)
        return await self._authenticate(server, login, password)

    async def _authenticate(self, server: SMTP, login: bytes, password: bytes) -> AuthResult:
        assert server.session is not None
        address = str(server.session.peer[0]) if server.session.peer else ""
        gateway = self.gateway
        async with gateway.failures.turn(address):
            if gateway.failures.blocked(address):
                log.warning("gateway.throttled", gateway="smtp", address=address)
                return AuthResult(success=False, handled=False, message=AUTH_THROTTLED)
            try:
                submitter = await self._check(login, password)
            except StoreUnavailableError:
                return AuthResult(success=False, handled=False, message=AUTH_UNAVAILABLE)
            if submitter is None:
                gateway.failures.failed(address)
                log.warning("gateway.unauthorized", gateway="smtp")
                return AuthResult(success=False, handled=False, message=AUTH_REFUSED)
        gateway.trusted.add(address)
        return AuthResult(success=True, auth_data=submitter, message=AUTH_OK)

    async def _check(self, login: bytes, password: bytes) -> Submitter | None:
        """The domain ``login`` and ``password`` authenticate, or None."""
        parsed = _login(login)
        try:
            key = password.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if parsed is None or not key:
            return None
        name, domain = parsed
        doc = await self.gateway.authorizer.domain(domain)
        if doc is None:
            return None
        if name is None:
            stored = doc.get("key_hash")
            if isinstance(stored, str) and await self.gateway.passwords.matches(key, stored):
                return Submitter(domain)
            named = doc
        else:
            named = {
                **doc,
                "api_keys": [k for k in doc.get("api_keys", []) if k.get("name") == name],
            }
        if await api_key_matches(self.gateway.api_keys, named, key):
            return Submitter(domain)
        return None

    # The envelope.

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        """Take the envelope sender (checked with the message, once it has come)."""
        return take_sender(envelope, address, mail_options)

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Take a recipient, up to MAILBUS_GATEWAY_SMTP_MAX_RECIPIENTS."""
        if len(envelope.rcpt_tos) >= self.max_recipients:
            return TOO_MANY_RECIPIENTS
        if len(address) > 320:
            return "553 5.1.3 Recipient address too long"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """The message as a job, published and confirmed before it is accepted."""
        # auth_required: no DATA comes before an AUTH, which leaves its Submitter here.
        submitter = cast(Submitter, session.auth_data)
        content = envelope.content
        assert isinstance(content, bytes)  # decode_data is off
        try:
            message, fields = split_steering(content)
            raw = raw_job(
                domain=submitter.domain,
                mail_from=envelope.mail_from or "",
                rcpt_to=envelope.rcpt_tos,
                message=message,
                steering=read_steering(fields, utcnow()),
            )
            # Reading the headers costs up to a fraction of a second: off the event loop.
            job = await asyncio.to_thread(
                legacy.checked_job, raw, special_use=self.settings.allow_special_use_domains
            )
        except GatewayRequestError as exc:
            return f"554 5.6.0 {_one_line(str(exc))}"
        try:
            refusal = await self.gateway.authorizer.refusal(job, Authority(domain=submitter.domain))
            if refusal is not None:
                return f"550 5.7.1 {_one_line(refusal)}"
            job_id, _ = await self.gateway.publish(raw, now=False, vouched=submitter.domain)
        except Exception as exc:
            # The broker's failures come in many types (aio-pika's, aiormq's, closed
            # channels while it restarts); each means the same to the client: try later.
            log.warning("gateway.unavailable", gateway="smtp", error=f"{type(exc).__name__}: {exc}")
            return UNAVAILABLE
        log.info("gateway.request", gateway="smtp", id=job_id, recipients=len(envelope.rcpt_tos))
        return f"250 2.0.0 Queued as {job_id}"


class GatewayHandler(Protocol):
    """An aiosmtpd handler of the gateway's: submission, or the bounce listener's."""

    gateway: Gateway


class SubmissionServer(SMTP):
    """One SMTP session, holding one of the gateways' connection slots."""

    def __init__(self, handler: GatewayHandler, **options: Any) -> None:
        super().__init__(handler, **options)
        self.gateway = handler.gateway
        self.submitting = False  # a message is being taken in: not to be cut off
        self.refused = False  # no slot was free: closed at once

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Take a slot, or answer 421 when every slot is busy (once: STARTTLS makes the
        connection again over TLS).
        """
        if self._original_transport is None:
            stream = cast(asyncio.Transport, transport)
            if not self.gateway.slots.admit(self, stream.abort):
                self.refused = True
                stream.write(f"{BUSY}\r\n".encode())
                stream.close()
                return
            self.gateway.sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        """Free the slot."""
        self.gateway.slots.release(self)
        self.gateway.sessions.discard(self)
        if not self.refused:  # a refused one never began a session to end
            super().connection_lost(error)

    async def smtp_DATA(self, arg: str) -> None:
        """A message coming in from a client that authenticated and named its recipients:
        this session is being answered, not let go for room, until the answer is given.
        """
        taking = self.taking()
        if taking:
            self.gateway.slots.answering(self)
            self.submitting = True
        try:
            await super().smtp_DATA(arg)
        finally:
            if taking:
                self.submitting = False
                transport = cast(asyncio.Transport | None, self.transport)
                if transport is not None:
                    self.gateway.slots.waiting(self, transport.abort)

    def taking(self) -> bool:
        """Whether the DATA about to come is a message this session takes in: its client
        authenticated and named recipients.
        """
        session, envelope = self.session, self.envelope
        return bool(session and session.authenticated and envelope and envelope.rcpt_tos)

    def shut(self) -> None:
        """Say 421 and close (the gateway is stopping)."""
        transport = cast(asyncio.Transport | None, self.transport)
        if transport is not None and not transport.is_closing():
            with contextlib.suppress(ConnectionError, ssl.SSLError, RuntimeError):
                transport.write(f"{SHUTTING_DOWN}\r\n".encode())
            transport.close()


def message_limit(settings: Settings) -> int:
    """The largest message a client may submit: MAILBUS_MAX_MESSAGE_BYTES, and no more than
    a job can carry once base64-encoded (MAILBUS_MAX_JOB_BYTES), so that nothing is
    accepted that a worker would refuse as too large.
    """
    return min(
        settings.max_message_bytes - _ADDED_HEADERS,
        (settings.max_job_bytes - _JOB_OVERHEAD) * 3 // 4,
    )


def session_factory(
    gateway: Gateway, *, tls: ssl.SSLContext | None, implicit: bool, loopback: bool
) -> Callable[[], SubmissionServer]:
    """The protocol factory of one SMTP listener: STARTTLS offered, and required before
    AUTH, when ``tls`` is given (``implicit``: the listener is TLS already); AUTH without
    TLS only on a ``loopback`` listener when MAILBUS_GATEWAY_SMTP_LOOPBACK_PLAIN_AUTH says so.
    """
    settings = gateway.settings
    handler = SubmissionHandler(gateway)
    plain = loopback and settings.gateway_smtp_loopback_plain_auth

    def factory() -> SubmissionServer:
        with warnings.catch_warnings():
            # AUTH without TLS is what the operator allowed, on loopback only: not news.
            warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
            return _session(handler)

    def _session(handler: SubmissionHandler) -> SubmissionServer:
        return SubmissionServer(
            handler,
            ident="mailbus",
            data_size_limit=message_limit(settings),
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=None if implicit else tls,
            require_starttls=tls is not None and not implicit and not plain,
            timeout=settings.gateway_read_timeout,
            auth_required=True,
            auth_require_tls=not (implicit or plain),
            auth_exclude_mechanism=["CRAM-MD5"],
        )

    return factory
