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
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractRobustConnection
from aiohttp import web

from consumer.amqp import topology
from consumer.amqp.publish import Replies, job_message, jobs_exchange
from consumer.clock import utcnow
from consumer.core import legacy
from consumer.core.names import SEND_KEY, SEND_NOW_KEY, Names
from consumer.core.smtp_request import smtp_override_url
from consumer.core.status import start_of_day, today_of
from consumer.errors import ConfigurationError, GatewayRequestError, MailbusError
from consumer.logging import get_logger
from consumer.service.admission import ConnectionSlots, FailedLogins, TrustedAddresses
from consumer.service.authorization import Authority, Authorizer, VerifiedKeys, broker_login
from consumer.settings import Settings
from consumer.store.mongo import Mongo
from consumer.vault import Vault

log = get_logger(__name__)
REST_PATHS = ("/api/mail", "/api/mail/new")
_READ_SIZE = 64 * 1024
# After answering before the whole body came (413, 408), the rest is read and dropped
# this long so that the client sees the answer, not a reset (aiohttp's default is 10 s).
_LINGER_SECONDS = 2.0
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
    ) -> None:
        self.settings = settings
        self.exchange = exchange
        self.replies = replies
        self.jobs = mongo.jobs
        self.authorizer = Authorizer(mongo.domains, open_domains=settings.open_domains)
        self.user = broker_login(settings.amqp_url.get_secret_value())
        self.limit = settings.gateway_max_request_bytes
        self.waited = settings.gateway_wait_seconds
        self.header_timeout = settings.gateway_header_timeout
        self.read_timeout = settings.gateway_read_timeout
        # Both gateways together: one budget of connections, one count of failures.
        self.slots: ConnectionSlots[object] = ConnectionSlots(settings.gateway_max_connections)
        self.guards: dict[asyncio.BaseTransport, _GuardedConnection] = {}
        self.failures = FailedLogins(settings.gateway_auth_failures, settings.gateway_auth_window)
        self.trusted = TrustedAddresses()
        self._passwords = VerifiedKeys()
        self._tasks: set[asyncio.Task[None]] = set()
        # Seals the SMTP servers daemon requests name (check_settings wants the key).
        self.vault = Vault.optional(settings) if settings.gateway_smtp_overrides else None

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
            yield cls(settings=settings, exchange=exchange, replies=replies, mongo=mongo)

    async def publish(self, job: Mapping[str, Any], *, now: bool) -> tuple[str, Any]:
        """Publish ``job`` as the gateway's broker user. With ``now``, to ``send.now`` and
        wait for the worker's answer (None when none came within the wait).
        """
        message = job_message(job)
        message.user_id = self.user
        assert message.message_id is not None  # job_message always sets it
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
        """The aiohttp application serving ``PUT /api/mail``."""
        app = web.Application(client_max_size=self.limit)
        for path in REST_PATHS:
            app.router.add_put(path, self._rest)
        return app

    async def _rest(self, request: web.Request) -> web.Response:
        guard = self.guards.get(request.transport) if request.transport else None
        if guard is not None:
            guard.headers_read()
        response = await self._rest_response(request)
        response.force_close()  # one request a connection: none left idle, none to drip
        return response

    async def _rest_response(self, request: web.Request) -> web.Response:
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
            return web.json_response(reply, status=413)
        except TimeoutError:
            reply = legacy.rest_reply("failed", f"body not sent within {self.read_timeout} s")
            return web.json_response(reply, status=408)
        except (ValueError, RecursionError):  # RecursionError: hostile nesting
            return web.json_response(legacy.rest_reply("failed", "body is not valid JSON"))
        texts = {k: v for k, v in fields.items() if isinstance(v, str)}
        try:
            reply = await self._rest_answer(texts, address)
        except (MailbusError, aio_pika.exceptions.AMQPException) as exc:
            log.warning("gateway.unavailable", gateway="rest", error=str(exc))
            reply = legacy.rest_reply("failed", f"mail service unavailable: {exc}")
            return web.json_response(reply, status=503)
        log.info("gateway.request", gateway="rest", status=reply["status"], id=reply.get("id"))
        if reply["message"] == TOO_MANY_FAILURES:
            return web.json_response(reply, status=429)
        return web.json_response(reply)

    async def _rest_answer(self, fields: Mapping[str, str], address: str) -> dict[str, Any]:
        try:
            mail = legacy.rest_mail(fields)
            job = legacy.checked_job(mail.job)
        except GatewayRequestError as exc:
            return legacy.rest_reply("failed", str(exc))
        if await self.authorizer.domain(job.domain) is None:
            return legacy.rest_reply("failed", "Invalid Domain")
        async with self.failures.turn(address):
            if self.failures.blocked(address):
                log.warning("gateway.throttled", gateway="rest", address=address)
                return legacy.rest_reply("failed", TOO_MANY_FAILURES)
            if await self.authorizer.refusal(job, Authority()) is not None:
                self.failures.failed(address)
                return legacy.rest_reply("failed", "invalid domain key")
        self.trusted.add(address)
        job_id, answer = await self.publish(mail.job, now=mail.send_now)
        if mail.send_now:
            return legacy.rest_send_now_reply(answer, self.waited, job_id)
        return legacy.rest_reply("success", "Message saved", job_id)

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
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            self.slots.release(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._tasks.discard(task)

    async def _serve_daemon_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: str
    ) -> None:
        limit = self.size_limit(address)
        try:
            request = await read_request(
                reader, limit, first=self.header_timeout, whole=self.read_timeout
            )
        except TooLargeError:
            writer.write(
                legacy.daemon_reply("error", too_large(limit, self.limit), "invalid payload")
            )
            return
        except (TimeoutError, ConnectionError):
            return
        if writer.transport.is_closing():  # let go to make room for another client
            return
        self.slots.answering(asyncio.current_task())
        if request.strip():
            writer.write(await self._daemon_answer(request, address))

    async def _daemon_answer(self, line: bytes, address: str) -> bytes:
        try:
            request = legacy.daemon_request(line)
        except GatewayRequestError as exc:
            return legacy.daemon_reply("error", None, str(exc))
        async with self.failures.turn(address):
            if self.failures.blocked(address):
                log.warning("gateway.throttled", gateway="daemon", address=address)
                return legacy.daemon_reply("error", TOO_MANY_FAILURES, "unauthorized request")
            if not await self._authenticated(request.auth):
                self.failures.failed(address)
                log.warning("gateway.unauthorized", gateway="daemon", request=request.name)
                return legacy.daemon_reply("error", None, "unauthorized request")
        self.trusted.add(address)
        try:
            reply = await self._daemon_request(request)
        except (MailbusError, aio_pika.exceptions.AMQPException) as exc:
            log.warning("gateway.unavailable", gateway="daemon", error=str(exc))
            reply = legacy.daemon_reply("error", str(exc), "mail service unavailable")
        log.info("gateway.request", gateway="daemon", request=request.name)
        return reply

    async def _authenticated(self, password: str | None) -> bool:
        stored = self.settings.gateway_password_hash
        if stored is None or password is None:
            return False
        return await self._passwords.matches(password, stored.get_secret_value())

    async def _daemon_request(self, request: legacy.DaemonRequest) -> bytes:
        if request.name == "ping":
            return legacy.daemon_reply("success", None, "pong")
        domain = self.settings.gateway_domain
        assert domain is not None  # check_settings refuses to serve without it
        if request.name == "status":
            since = start_of_day(utcnow())
            today = today_of(await self.jobs.finished_since(since), {}, since)
            return legacy.daemon_status_reply(today, domain)
        if request.name in legacy.DAEMON_ELSEWHERE:
            elsewhere = legacy.DAEMON_ELSEWHERE[request.name]
            note = f"not served by the mailbus gateway: use `{elsewhere}`"
            return legacy.daemon_reply("error", note, "invalid request")
        if request.name not in ("sendMail", "queueMail"):
            return legacy.daemon_reply("error", None, "invalid request")
        queued = request.name == "queueMail"
        failed = "failed to add mail to queue" if queued else "failed to send mail"
        try:
            raw = legacy.daemon_job(
                request.payload,
                domain=domain,
                default_from=self.settings.gateway_from,
                queued=queued,
                smtp_overrides=self.vault is not None,
            )
            raw.update(self._sealed_server(request.payload))
            job = legacy.checked_job(raw)
        except GatewayRequestError as exc:
            return legacy.daemon_reply("error", str(exc), failed)
        refusal = await self.authorizer.refusal(job, Authority(self.user))
        if refusal is not None:
            return legacy.daemon_reply("error", refusal, failed)
        job_id, answer = await self.publish(raw, now=not queued)
        if queued:
            return legacy.daemon_reply("success", {"id": job_id}, "mail added to queue")
        return legacy.daemon_sent_reply(answer, self.waited, job_id)

    def _sealed_server(self, mail: Mapping[str, Any]) -> dict[str, str]:
        """The job's ``smtp_sealed`` for the SMTP server ``mail`` names, if it names one:
        its URL sealed whole, so that only this gateway's key can name a server.
        """
        if self.vault is None:
            return {}
        default = self.settings.default_smtp_url
        url = smtp_override_url(
            mail, default_url=default.get_secret_value() if default is not None else None
        )
        return {} if url is None else {"smtp_sealed": self.vault.encrypt(url)}

    async def finish(self) -> None:
        """Wait for the daemon requests in progress (bounded by the drain timeout)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.settings.drain_timeout)


def check_settings(settings: Settings, *, daemon: bool) -> None:
    """Refuse to serve the daemon gateway without what it needs."""
    if not daemon:
        return
    missing = [
        f"MAILBUS_{name.upper()}"
        for name in ("gateway_password_hash", "gateway_domain")
        if getattr(settings, name) is None
    ]
    if missing:
        raise ConfigurationError(
            f"the daemon gateway needs {' and '.join(missing)} "
            "(make the hash with `mailbus gateway hash-password`)"
        )
    if settings.gateway_smtp_overrides and settings.secret_key is None:
        raise ConfigurationError(
            "MAILBUS_GATEWAY_SMTP_OVERRIDES needs MAILBUS_SECRET_KEY: it seals the SMTP "
            "servers requests name (create one with `mailbus outbox new-key`)"
        )


async def serve(
    settings: Settings,
    stop: asyncio.Event,
    *,
    rest: Listen | None,
    daemon: Listen | None,
    started: asyncio.Future[dict[str, int]] | None = None,
) -> None:
    """Serve the gateways until ``stop`` is set, then let the requests in progress finish.

    ``started`` (if given) is resolved with the ports bound, by gateway name.
    """
    check_settings(settings, daemon=daemon is not None)
    async with Gateway.connected(settings) as gateway:
        ports: dict[str, int] = {}
        runner: web.AppRunner | None = None
        rest_server: asyncio.Server | None = None
        server: asyncio.Server | None = None
        try:
            if rest is not None:
                runner = web.AppRunner(
                    gateway.rest_app(), access_log=None, lingering_time=_LINGER_SECONDS
                )
                await runner.setup()
                aiohttp_server = runner.server
                assert aiohttp_server is not None  # set up
                rest_server = await asyncio.get_running_loop().create_server(
                    lambda: _GuardedConnection(aiohttp_server(), gateway), rest.host, rest.port
                )
                ports["rest"] = rest_server.sockets[0].getsockname()[1]
            if daemon is not None:
                server = await asyncio.start_server(
                    gateway.serve_daemon_client, daemon.host, daemon.port
                )
                ports["daemon"] = server.sockets[0].getsockname()[1]
            log.info("gateway.listening", **ports)
            if started is not None:
                started.set_result(ports)
            await stop.wait()
        finally:
            for listening in (server, rest_server):
                if listening is not None:
                    listening.close()
            await gateway.finish()
            if runner is not None:
                await runner.cleanup()
