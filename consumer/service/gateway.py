"""The compatibility gateways for the older systems' clients: the REST server's
``PUT /api/mail`` (served by aiohttp) and the daemon's JSON-over-TCP listener (asyncio
streams). Both publish v1 jobs to the broker and answer in the old formats.

What a request means is decided by the pure functions of :mod:`consumer.core.legacy`; this module
only talks to the network, the broker and the domain registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractRobustConnection
from aiohttp import hdrs, web

from consumer.amqp import topology
from consumer.amqp.outgoing import Outgoing
from consumer.amqp.publish import Replies, job_message, jobs_exchange
from consumer.clock import utcnow
from consumer.core import legacy
from consumer.core.events import unsubscribed_event
from consumer.core.message import Job
from consumer.core.names import SEND_KEY, SEND_NOW_KEY, Names
from consumer.core.rest_formats import Refused, answer_format, rest_xml
from consumer.core.returns import ReturnPaths
from consumer.core.unsubscribe import (
    LINK_PATH,
    TokenRefused,
    confirmation_page,
    read_token,
    token_digest,
)
from consumer.core.vocabulary import RestFormat
from consumer.errors import (
    ConfigurationError,
    GatewayRequestError,
    ListenError,
    MailbusError,
)
from consumer.logging import get_logger
from consumer.service.admission import ConnectionSlots, FailedLogins, TrustedAddresses
from consumer.service.authorization import (
    Authority,
    Authorizer,
    VerifiedKeys,
    api_key_matches,
    broker_login,
    seal,
)
from consumer.service.bounces import bounce_factory
from consumer.service.daemon_api import DaemonApi
from consumer.service.health import Readiness, consuming_live, serving
from consumer.service.metrics import GatewayMetrics
from consumer.service.smtp_intake import SubmissionServer, session_factory
from consumer.service.tls import daemon_context
from consumer.settings import Settings
from consumer.store.mongo import Mongo
from consumer.vault import Vault

log = get_logger(__name__)
REST_PATHS = ("/api/mail", "/api/mail/new")
# The old server's ways of naming the answer's format in the address: mail.xml, mail/format/xml.
_FORMAT_SUFFIXES = ("", ".{format}", "/format/{format}")
API_KEY_HEADER = "X-API-KEY"
_READ_SIZE = 64 * 1024
# After answering before the whole body came (413, 408), the rest is read and dropped
# this long so that the client sees the answer, not a reset (aiohttp's default is 10 s).
_LINGER_SECONDS = 2.0
_Handler = Callable[[web.Request], Awaitable[web.Response]]
# The one-click POST's body is one short field (RFC 8058): more is refused unread.
_UNSUBSCRIBE_BODY = 1024
# A page or answer about a link: never cached, framed, or sent on as a referrer (the
# token is in its address), and it runs nothing.
_UNSUBSCRIBE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; form-action 'self'; frame-ancestors 'none'",
}
# What a REST client gets when every connection is busy answering.
_REST_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@dataclass(frozen=True)
class Listen:
    """Where one gateway listens."""

    host: str
    port: int


def listen_address(value: str) -> Listen:
    """``PORT`` or ``HOST:PORT`` (loopback when no host is given)."""
    host, _, port = value.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"not a port or HOST:PORT: {value!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port out of range: {number}")
    return Listen(host.strip("[]") or "127.0.0.1", number)


class TooLargeError(GatewayRequestError):
    """A daemon request longer than the client may send."""


TOO_MANY_FAILURES = "too many failed authentications, try again later"


def too_large(limit: int, full: int) -> str:
    """Why a request over ``limit`` bytes was refused (``full`` once authenticated)."""
    if limit < full:
        return (
            f"request larger than {limit} bytes, the limit until a request from this "
            f"address has authenticated ({full} bytes after)"
        )
    return f"request larger than {limit} bytes"


# The HTTP status of a REST answer other than 200, by its message: the old servers' own.
_REST_STATUS = {TOO_MANY_FAILURES: 429, legacy.INVALID_API_KEY: 403}


def _plain(text: str, status: int = 200) -> web.Response:
    """An unsubscribe answer: a line of plain text."""
    return web.Response(text=text + "\n", status=status, headers=_UNSUBSCRIBE_HEADERS)


def _rest_reply(reply: Mapping[str, Any], form: RestFormat, status: int = 200) -> web.Response:
    """A REST answer in the format the client asked for."""
    if form == "xml":
        return web.Response(
            body=rest_xml(reply), status=status, content_type="application/xml", charset="utf-8"
        )
    return web.json_response(reply, status=status)


async def read_request(
    reader: asyncio.StreamReader, limit: int, *, first: float, whole: float
) -> bytes:
    """One daemon request: up to its newline, a whole JSON object, or the end of input.
    Its first bytes must come within ``first`` seconds, all of it within ``whole``
    (TimeoutError); no more than ``limit`` bytes are held (TooLargeError).
    """
    frame = legacy.DaemonFrame()
    async with asyncio.timeout(whole):
        async with asyncio.timeout(first):
            chunk = await reader.read(min(_READ_SIZE, limit + 1))
        while chunk:
            request = frame.feed(chunk)
            if request is not None and len(request) <= limit:
                return request
            if len(frame) > limit:
                raise TooLargeError(f"request larger than {limit} bytes")
            chunk = await reader.read(min(_READ_SIZE, limit + 1 - len(frame)))
    return bytes(frame.buffer)


class _GuardedConnection(asyncio.Protocol):
    """A REST connection in front of aiohttp's protocol: it holds one of the gateway's
    slots and is closed unless its request's headers come within the header timeout
    (aiohttp has no such timeout: an idle or dripping client would stay for good).
    """

    def __init__(self, inner: asyncio.Protocol, gateway: Gateway) -> None:
        self.inner = inner
        self.gateway = gateway
        self.transport: asyncio.Transport | None = None
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Take a slot and start the header clock, or answer 503 when none is free."""
        # A stream transport, whatever its class (uvloop's is not asyncio.Transport's kin).
        transport = cast(asyncio.Transport, transport)
        if not self.gateway.slots.admit(self, transport.abort):
            transport.write(_REST_BUSY)
            transport.close()
            return
        self.transport = transport
        self.gateway.guards[transport] = self
        loop = asyncio.get_running_loop()
        self.deadline = loop.call_later(self.gateway.header_timeout, transport.abort)
        self.inner.connection_made(transport)

    def headers_read(self) -> None:
        """The request's headers came in time: it is answered, never let go."""
        if self.deadline is not None:
            self.deadline.cancel()
        self.gateway.slots.answering(self)

    def data_received(self, data: bytes) -> None:
        """Hand the bytes to aiohttp."""
        if self.transport is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        """Tell aiohttp the client has finished sending."""
        return self.inner.eof_received() if self.transport is not None else None

    def pause_writing(self) -> None:
        """Tell aiohttp the client reads slowly."""
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        """Tell aiohttp the client reads again."""
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        """Free the slot; aiohttp finishes the connection."""
        self.gateway.slots.release(self)
        if self.transport is None:
            return
        if self.deadline is not None:
            self.deadline.cancel()
        self.gateway.guards.pop(self.transport, None)
        self.inner.connection_lost(exc)


class Gateway:
    """Publishes the jobs of old-style requests; one broker connection for every request."""

    def __init__(
        self,
        *,
        settings: Settings,
        exchange: AbstractExchange,
        replies: Replies,
        mongo: Mongo,
        outgoing: Outgoing,
        connection: AbstractRobustConnection,
    ) -> None:
        self.settings = settings
        self.connection = connection
        self.exchange = exchange
        self.replies = replies
        # The bounce listener's job records and counts (it shares the suppressions and
        # the outgoing events below).
        self.jobs = mongo.jobs
        self.feedback = mongo.feedback
        self.authorizer = Authorizer(mongo.domains, open_domains=settings.open_domains)
        self.suppressions = mongo.suppressions
        self.outgoing = outgoing
        self.user = broker_login(settings.amqp_url.get_secret_value())
        # No password hash: the daemon's clients send none (its MAILER_AUTH = false).
        self.daemon_password = settings.gateway_password_hash
        self.daemon = (
            DaemonApi(
                settings=settings,
                jobs=mongo.jobs,
                templates=mongo.templates,
                outgoing=outgoing,
                publish=self.publish,
                refusal=self._daemon_refusal,
            )
            if settings.gateway_domain is not None
            else None
        )
        self.limit = settings.gateway_max_request_bytes
        self.waited = settings.gateway_wait_seconds
        self.header_timeout = settings.gateway_header_timeout
        self.read_timeout = settings.gateway_read_timeout
        # Both gateways together: one budget of connections, one count of failures.
        self.slots: ConnectionSlots[object] = ConnectionSlots(settings.gateway_max_connections)
        self.guards: dict[asyncio.BaseTransport, _GuardedConnection] = {}
        self.failures = FailedLogins(settings.gateway_auth_failures, settings.gateway_auth_window)
        self.trusted = TrustedAddresses()
        # Hashes checked once per key, shared by the daemon, REST and SMTP gateways.
        self.passwords = VerifiedKeys()
        self.api_keys = VerifiedKeys()
        self.sessions: set[SubmissionServer] = set()
        self.vault = Vault.optional(settings)  # seals the domain onto API-key requests' jobs
        self._tasks: set[asyncio.Task[None]] = set()

    def size_limit(self, address: str) -> int:
        """The largest request ``address`` may send: small until one of its requests has
        authenticated, so unknown clients cannot make the gateway hold megabytes each.
        """
        if address in self.trusted:
            return self.limit
        return min(self.limit, self.settings.gateway_unauthenticated_bytes)

    @classmethod
    @contextlib.asynccontextmanager
    async def connected(cls, settings: Settings) -> AsyncIterator[Gateway]:
        """A gateway with its broker connection and domain registry, closed on exit."""
        connection: AbstractRobustConnection = await aio_pika.connect_robust(
            settings.amqp_url.get_secret_value()
        )
        async with connection, Mongo.connect(settings) as mongo:
            channel = await connection.channel(publisher_confirms=True)
            names = Names(settings.prefix)
            # As a worker does: a gateway started first must not publish into nothing.
            await topology.declare(channel, names, settings.delivery_limit)
            replies = Replies(channel)
            await replies.start()
            exchange = await jobs_exchange(channel, names)
            outgoing = await Outgoing.open(channel, names, vault=Vault.optional(settings))
            yield cls(
                settings=settings,
                exchange=exchange,
                replies=replies,
                mongo=mongo,
                outgoing=outgoing,
                connection=connection,
            )

    async def publish(
        self, job: Mapping[str, Any], *, now: bool, vouched: str | None = None
    ) -> tuple[str, Any]:
        """Publish ``job`` as the gateway's broker user. With ``now``, to ``send.now`` and
        wait for the worker's answer (None when none came within the wait). With
        ``vouched``, the job carries, sealed, that it was authorized for that domain.
        """
        message = job_message(job)
        message.user_id = self.user
        assert message.message_id is not None  # job_message always sets it
        if vouched is not None:
            if self.vault is None:
                raise ConfigurationError(
                    "MAILBUS_SECRET_KEY is needed for API keys: the job carries no domain "
                    "key, so the gateway seals its authorization onto it"
                )
            message.headers = seal(
                message.headers,
                Authority(domain=vouched),
                message_id=message.message_id,
                body=message.body,
                vault=self.vault,
                expires=utcnow() + timedelta(days=self.settings.seal_days),
            )
        if not now:
            await self.exchange.publish(message, routing_key=SEND_KEY, mandatory=True)
            return message.message_id, None
        # Confirmed by the broker before the wait starts: "stays queued" is then true.
        waiting = await self.replies.ask(self.exchange, message, SEND_NOW_KEY)
        try:
            async with asyncio.timeout(self.waited):
                answer = await waiting
        except TimeoutError:
            return message.message_id, None
        return message.message_id, json.loads(answer)

    # The REST server's PUT /api/mail.

    def rest_app(self) -> web.Application:
        """The aiohttp application serving ``PUT /api/mail`` and the one-click unsubscribe
        links (``GET`` and ``POST /unsubscribe/TOKEN``).
        """
        app = web.Application(client_max_size=self.limit)
        for path in REST_PATHS:
            for suffix in _FORMAT_SUFFIXES:
                app.router.add_put(path + suffix, self._answered(self._rest_response))
        link = LINK_PATH + "{token}"
        app.router.add_get(link, self._answered(self._unsubscribe), allow_head=False)
        app.router.add_post(link, self._answered(self._unsubscribe))
        return app

    def _answered(self, handler: _Handler) -> _Handler:
        """``handler`` for a guarded connection: its headers came in time, and it is closed
        after one answer.
        """

        async def answer(request: web.Request) -> web.Response:
            guard = self.guards.get(request.transport) if request.transport else None
            if guard is not None:
                guard.headers_read()
            response = await handler(request)
            response.force_close()  # one request a connection: none left idle, none to drip
            return response

        return answer

    async def _rest_response(self, request: web.Request) -> web.Response:
        form = answer_format(
            request.match_info.get("format"),
            request.query.get("format"),
            request.headers.get(hdrs.ACCEPT),
        )
        if isinstance(form, Refused):
            return web.json_response(legacy.rest_reply("failed", form.reason()), status=406)
        address = request.remote or ""
        limit = self.size_limit(address)
        request = request.clone(client_max_size=limit)
        try:
            async with asyncio.timeout(self.read_timeout):
                if request.content_type == "application/json":
                    raw = await request.json()
                    fields = raw if isinstance(raw, dict) else {}
                else:
                    fields = dict(await request.post())
        except web.HTTPRequestEntityTooLarge:
            reply = legacy.rest_reply("failed", too_large(limit, self.limit))
            return _rest_reply(reply, form, 413)
        except TimeoutError:
            reply = legacy.rest_reply("failed", f"body not sent within {self.read_timeout} s")
            return _rest_reply(reply, form, 408)
        except (ValueError, RecursionError):  # RecursionError: hostile nesting
            return _rest_reply(legacy.rest_reply("failed", "body is not valid JSON"), form)
        texts = {k: v for k, v in fields.items() if isinstance(v, str)}
        api_key = request.headers.get(API_KEY_HEADER, "").strip() or None
        try:
            reply = await self._rest_answer(texts, address, api_key)
        except (MailbusError, aio_pika.exceptions.AMQPException) as exc:
            log.warning("gateway.unavailable", gateway="rest", error=str(exc))
            reply = legacy.rest_reply("failed", f"mail service unavailable: {exc}")
            return _rest_reply(reply, form, 503)
        except Exception:  # a broker restarting fails in many types: the client tries later
            log.exception("gateway.request_failed", gateway="rest")
            reply = legacy.rest_reply("failed", "mail service unavailable")
            return _rest_reply(reply, form, 503)
        log.info("gateway.request", gateway="rest", status=reply["status"], id=reply.get("id"))
        return _rest_reply(reply, form, _REST_STATUS.get(reply["message"], 200))

    async def _rest_answer(
        self, fields: Mapping[str, str], address: str, api_key: str | None
    ) -> dict[str, Any]:
        try:
            mail = legacy.rest_mail(fields, api_key=api_key is not None)
            job = legacy.checked_job(mail.job, special_use=self.settings.allow_special_use_domains)
        except GatewayRequestError as exc:
            return legacy.rest_reply("failed", str(exc))
        doc = await self.authorizer.domain(job.domain)
        if doc is None:
            return legacy.rest_reply("failed", "Invalid Domain")
        async with self.failures.turn(address):
            if self.failures.blocked(address):
                log.warning("gateway.throttled", gateway="rest", address=address)
                return legacy.rest_reply("failed", TOO_MANY_FAILURES)
            if api_key is not None and not await api_key_matches(self.api_keys, doc, api_key):
                self.failures.failed(address)
                return legacy.rest_reply("failed", legacy.INVALID_API_KEY)
            if api_key is None and await self.authorizer.refusal(job, Authority()) is not None:
                self.failures.failed(address)
                return legacy.rest_reply("failed", "invalid domain key")
        self.trusted.add(address)
        vouched = job.domain.lower() if api_key is not None else None
        if vouched is not None:
            # The key holds; the From must still be one the domain may send as.
            refusal = await self.authorizer.refusal(job, Authority(domain=vouched))
            if refusal is not None:
                return legacy.rest_reply("failed", refusal)
        job_id, answer = await self.publish(mail.job, now=mail.send_now, vouched=vouched)
        if mail.send_now:
            return legacy.rest_send_now_reply(answer, self.waited, job_id)
        return legacy.rest_reply("success", "Message saved", job_id)

    # One-click unsubscribe (RFC 8058): the link's token is the only authority.

    async def _unsubscribe(self, request: web.Request) -> web.Response:
        """GET shows the confirmation page; POST (the one-click request, or the page's
        form) suppresses the link's recipient for its list and announces it. Idempotent.
        """
        address = request.remote or ""
        token = request.match_info["token"]
        if request.method == hdrs.METH_POST:
            try:
                async with asyncio.timeout(self.read_timeout):
                    await request.clone(client_max_size=_UNSUBSCRIBE_BODY).read()
            except web.HTTPRequestEntityTooLarge:
                return _plain(f"body larger than {_UNSUBSCRIBE_BODY} bytes", 413)
            except TimeoutError:
                return _plain(f"body not sent within {self.read_timeout} s", 408)
        if self.vault is None:
            log.warning("gateway.unsubscribe_unavailable", note="no MAILBUS_SECRET_KEY")
            return _plain("unsubscribe links are not served here now", 503)
        async with self.failures.turn(address):
            if self.failures.blocked(address):
                log.warning("gateway.throttled", gateway="unsubscribe", address=address)
                return _plain(TOO_MANY_FAILURES, 429)
            try:
                asked = read_token(token, self.vault, utcnow())
            except TokenRefused as exc:
                self.failures.failed(address)
                log.warning(
                    "gateway.unsubscribe_refused", token=token_digest(token), error=str(exc)
                )
                return _plain(str(exc), 400)
        if request.method != hdrs.METH_POST:
            page = confirmation_page(asked)
            return web.Response(text=page, content_type="text/html", headers=_UNSUBSCRIBE_HEADERS)
        suppressions, scope = self.suppressions, asked.scope
        try:
            # A link used again says "unsubscribed" again, and announces nothing more: a
            # link holder cannot flood the domain's webhooks. The event is owed until it
            # has been published, so a publish that failed is made by the next request.
            if not await suppressions.announced(asked.recipient, scope=scope):
                await suppressions.add_automatic(
                    {asked.recipient: "one-click unsubscribe"}, scope=scope, source="unsubscribe"
                )
                await self.outgoing.event(*unsubscribed_event(asked, utcnow()))
                await suppressions.mark_announced(asked.recipient, scope=scope)
        except (MailbusError, aio_pika.exceptions.AMQPException) as exc:
            log.warning("gateway.unavailable", gateway="unsubscribe", error=str(exc))
            return _plain("mail service unavailable, try again later", 503)
        except Exception:  # a broker restarting fails in many types: the client tries later
            log.exception("gateway.request_failed", gateway="unsubscribe")
            return _plain("mail service unavailable, try again later", 503)
        log.info(
            "gateway.unsubscribed",
            domain=asked.domain,
            list=asked.list_name,
            id=asked.job_id,
            token=token_digest(token),
        )
        return _plain("unsubscribed")

    # The daemon's JSON over TCP.

    async def serve_daemon_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answer one request, then close: the old clients sent one per connection."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        address = str(writer.get_extra_info("peername", ("",))[0])
        try:
            if not self.slots.admit(task, writer.transport.abort):
                busy = "too many connections, try again later"
                writer.write(legacy.daemon_reply("error", busy, "mail service unavailable"))
            else:
                await self._serve_daemon_request(reader, writer, address)
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.drain()
        finally:
            self.slots.release(task)
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
            self._tasks.discard(task)

    async def _serve_daemon_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: str
    ) -> None:
        # An open gateway has no authentication to wait for before taking whole requests.
        limit = self.limit if self.daemon_password is None else self.size_limit(address)
        try:
            request = await read_request(
                reader, limit, first=self.header_timeout, whole=self.read_timeout
            )
        except TooLargeError:
            writer.write(
                legacy.daemon_reply("error", too_large(limit, self.limit), "invalid payload")
            )
            return
        except (TimeoutError, ConnectionError, ssl.SSLError):  # a TLS client that broke off
            return
        if writer.transport.is_closing():  # let go to make room for another client
            return
        self.slots.answering(asyncio.current_task())
        if request.strip():
            writer.write(await self._daemon_answer(request, address))

    async def _daemon_answer(self, frame: bytes, address: str) -> bytes:
        """The answer to one request: its password checked first (when one is set), then
        what it asks.
        """
        try:
            value, unreadable = legacy.daemon_value(frame), None
        except GatewayRequestError as exc:
            value, unreadable = None, str(exc)
        if self.daemon_password is not None:
            async with self.failures.turn(address):
                if self.failures.blocked(address):
                    log.warning("gateway.throttled", gateway="daemon", address=address)
                    return legacy.daemon_reply("error", TOO_MANY_FAILURES, legacy.UNAUTHORIZED)
                password = legacy.daemon_password(value)
                stored = self.daemon_password.get_secret_value()
                if password is None or not await self.passwords.matches(password, stored):
                    self.failures.failed(address)
                    log.warning("gateway.unauthorized", gateway="daemon")
                    return legacy.daemon_reply("error", None, legacy.UNAUTHORIZED)
            self.trusted.add(address)
        if unreadable is not None:
            return legacy.daemon_reply("error", None, unreadable)
        try:
            request = legacy.daemon_request(value, password=self.daemon_password is not None)
        except GatewayRequestError as exc:
            return legacy.daemon_reply("error", None, str(exc))
        assert self.daemon is not None  # check_settings refuses to serve without a domain
        try:
            reply = await self.daemon.answer(request)
        except (MailbusError, aio_pika.exceptions.AMQPException) as exc:
            log.warning("gateway.unavailable", gateway="daemon", error=str(exc))
            reply = legacy.daemon_reply("error", str(exc), "mail service unavailable")
        except Exception:  # one request's fault stays with it: answered, logged, not fatal
            log.exception("gateway.request_failed", gateway="daemon", request=request.name)
            reply = legacy.daemon_reply("error", None, "mail service unavailable")
        log.info("gateway.request", gateway="daemon", request=request.name)
        return reply

    async def _daemon_refusal(self, job: Job) -> str | None:
        """Why the daemon gateway may not publish ``job`` (as its broker user), or None."""
        return await self.authorizer.refusal(job, Authority(self.user))

    async def finish(self) -> None:
        """Wait for the daemon requests and SMTP submissions in progress (bounded by the
        drain timeout together), then tell every SMTP session left 421 and close it.
        """
        deadline = asyncio.get_running_loop().time() + self.settings.drain_timeout
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.settings.drain_timeout)
        for session in list(self.sessions):
            if not session.submitting:
                session.shut()
        while any(s.submitting for s in self.sessions):
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.shut()


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _check_tls_pair(settings: Settings) -> None:
    """Refuse a certificate without its key, or a key without its certificate."""
    if (settings.gateway_tls_cert is None) != (settings.gateway_tls_key is None):
        raise ConfigurationError(
            "MAILBUS_GATEWAY_TLS_CERT and MAILBUS_GATEWAY_TLS_KEY go together: "
            "both for TLS, neither for plain TCP"
        )


def check_settings(settings: Settings, *, daemon: Listen | None) -> None:
    """Refuse to serve the daemon gateway without what it needs, and an open one (no
    password hash) beyond loopback unless MAILBUS_GATEWAY_OPEN_BEYOND_LOOPBACK says so.
    """
    if daemon is None:
        return
    _check_tls_pair(settings)
    if settings.gateway_domain is None:
        raise ConfigurationError("the daemon gateway needs MAILBUS_GATEWAY_DOMAIN")
    if settings.gateway_smtp_overrides and settings.secret_key is None:
        raise ConfigurationError(
            "MAILBUS_GATEWAY_SMTP_OVERRIDES needs MAILBUS_SECRET_KEY: it seals the SMTP "
            "servers requests name (create one with `mailbus outbox new-key`)"
        )
    folder = settings.gateway_template_dir
    if folder is not None and not folder.is_dir():
        raise ConfigurationError(f"MAILBUS_GATEWAY_TEMPLATE_DIR: {folder} is not a directory")
    if settings.gateway_password_hash is not None:
        return
    if daemon.host not in _LOOPBACK and settings.gateway_smtp_overrides:
        raise ConfigurationError(
            "an open daemon gateway (no MAILBUS_GATEWAY_PASSWORD_HASH) takes per-request SMTP "
            "settings (MAILBUS_GATEWAY_SMTP_OVERRIDES) on loopback only"
        )
    if daemon.host not in _LOOPBACK and not settings.gateway_open_beyond_loopback:
        raise ConfigurationError(
            f"the daemon gateway has no password (MAILBUS_GATEWAY_PASSWORD_HASH) and would "
            f"listen on {daemon.host}: set the hash (`mailbus gateway hash-password`), listen "
            "on loopback, or set MAILBUS_GATEWAY_OPEN_BEYOND_LOOPBACK=true"
        )
    log.warning(
        "gateway.open",
        gateway="daemon",
        host=daemon.host,
        note="no MAILBUS_GATEWAY_PASSWORD_HASH: any client that reaches the port sends mail "
        f"for {settings.gateway_domain}",
    )


def check_submission(settings: Settings, *, smtp: Listen | None, smtps: Listen | None) -> None:
    """Refuse to serve SMTP submission without what it needs: MAILBUS_SECRET_KEY (its jobs
    carry the domain the gateway vouches for, sealed) and, for implicit TLS, a certificate.
    """
    if smtp is None and smtps is None:
        return
    _check_tls_pair(settings)
    if settings.secret_key is None:
        raise ConfigurationError(
            "the SMTP gateway needs MAILBUS_SECRET_KEY, shared with the workers: it seals "
            "the domain a client authenticated for onto each job"
        )
    if smtps is not None and settings.gateway_tls_cert is None:
        raise ConfigurationError(
            "--smtps needs MAILBUS_GATEWAY_TLS_CERT and MAILBUS_GATEWAY_TLS_KEY"
        )


def check_bounces(settings: Settings, *, bounces: Listen | None) -> ReturnPaths | None:
    """The return addresses the bounce listener takes mail for (at MAILBUS_BOUNCE_DOMAIN,
    if set, and at the registered domains' own bounce domains); refuses to serve it
    without MAILBUS_SECRET_KEY.
    """
    if bounces is None:
        return None
    _check_tls_pair(settings)
    returns = ReturnPaths.configured(settings)
    if returns is None:
        raise ConfigurationError(
            "--bounces needs MAILBUS_SECRET_KEY, shared with the workers: it checks the "
            "signature of each return address"
        )
    return returns


@contextlib.contextmanager
def _listening(option: str, listen: Listen) -> Iterator[None]:
    """A listener's address that cannot be listened on is said in one line."""
    try:
        yield
    except OSError as exc:
        raise ListenError(option, listen.host, listen.port, exc) from None


@dataclass
class _Endpoints:
    """The gateway's HTTP endpoints: the port they are served on (``ports["http"]``, with
    the gateways' ports added), and whether every gateway is listening.
    """

    ports: dict[str, int]
    listening: bool = False


@contextlib.asynccontextmanager
async def _endpoints(gateway: Gateway) -> AsyncIterator[_Endpoints]:
    """Serve /metrics, /healthz and /readyz while the block runs, if MAILBUS_HTTP_PORT is
    set: ready once listening, on a RabbitMQ connection that is up, with MongoDB answering.
    """
    endpoints = _Endpoints({})
    settings = gateway.settings
    if settings.http_port is None:
        yield endpoints
        return
    metrics = GatewayMetrics(lambda: len(gateway.slots), gateway.slots.limit)
    readiness = Readiness(
        asyncio.get_running_loop(),
        lambda: consuming_live(endpoints.listening, gateway.connection),
        gateway.jobs.ping,
        not_ready="not listening, or not connected to RabbitMQ",
    )
    with serving(
        settings.http_host,
        settings.http_port,
        metrics.registry,
        readiness,
        max_connections=settings.http_max_connections,
        read_timeout=settings.http_read_timeout,
    ) as server:
        endpoints.ports["http"] = server.server_port
        yield endpoints


async def serve(
    settings: Settings,
    stop: asyncio.Event,
    *,
    rest: Listen | None,
    daemon: Listen | None,
    smtp: Listen | None = None,
    smtps: Listen | None = None,
    bounces: Listen | None = None,
    started: asyncio.Future[dict[str, int]] | None = None,
) -> None:
    """Serve the gateways until ``stop`` is set, then let the requests in progress finish
    (SMTP sessions not submitting a message are told 421 and closed).

    ``started`` (if given) is resolved with the ports bound, by gateway name.
    """
    check_settings(settings, daemon=daemon)
    check_submission(settings, smtp=smtp, smtps=smtps)
    returns = check_bounces(settings, bounces=bounces)
    listening_tls = (daemon or smtp or smtps or bounces) is not None
    tls = daemon_context(settings) if listening_tls else None
    async with Gateway.connected(settings) as gateway, _endpoints(gateway) as endpoints:
        ports = endpoints.ports
        runner: web.AppRunner | None = None
        rest_server: asyncio.Server | None = None
        server: asyncio.Server | None = None
        submission: list[asyncio.Server] = []
        try:
            if rest is not None:
                runner = web.AppRunner(
                    gateway.rest_app(), access_log=None, lingering_time=_LINGER_SECONDS
                )
                await runner.setup()
                aiohttp_server = runner.server
                assert aiohttp_server is not None  # set up
                with _listening("--rest", rest):
                    rest_server = await asyncio.get_running_loop().create_server(
                        lambda: _GuardedConnection(aiohttp_server(), gateway), rest.host, rest.port
                    )
                ports["rest"] = rest_server.sockets[0].getsockname()[1]
            if daemon is not None:
                # A TLS client that has not finished its handshake within the header
                # timeout (a plain-text one never does) is let go; it holds no slot.
                with _listening("--daemon", daemon):
                    server = await asyncio.start_server(
                        gateway.serve_daemon_client,
                        daemon.host,
                        daemon.port,
                        ssl=tls,
                        ssl_handshake_timeout=gateway.header_timeout if tls is not None else None,
                    )
                ports["daemon"] = server.sockets[0].getsockname()[1]
            loop = asyncio.get_running_loop()
            for name, listen, implicit in (("smtp", smtp, False), ("smtps", smtps, True)):
                if listen is None:
                    continue
                factory = session_factory(
                    gateway, tls=tls, implicit=implicit, loopback=listen.host in _LOOPBACK
                )
                with _listening(f"--{name}", listen):
                    listening = await loop.create_server(
                        factory,
                        listen.host,
                        listen.port,
                        ssl=tls if implicit else None,
                        ssl_handshake_timeout=gateway.header_timeout if implicit else None,
                    )
                submission.append(listening)
                ports[name] = listening.sockets[0].getsockname()[1]
            if bounces is not None and returns is not None:
                with _listening("--bounces", bounces):
                    listening = await loop.create_server(
                        bounce_factory(gateway, returns, tls), bounces.host, bounces.port
                    )
                submission.append(listening)
                ports["bounces"] = listening.sockets[0].getsockname()[1]
            endpoints.listening = True
            log.info("gateway.listening", **ports)
            if started is not None:
                started.set_result(ports)
            await stop.wait()
        finally:
            endpoints.listening = False  # draining: not ready for new clients
            for open_server in (server, rest_server, *submission):
                if open_server is not None:
                    open_server.close()
            await gateway.finish()
            if runner is not None:
                await runner.cleanup()
