"""The compatibility gateways for the older systems' clients: the REST server's
``PUT /api/mail`` (served by aiohttp) and the daemon's JSON-over-TCP listener (asyncio
streams). Both publish v1 jobs to the broker and answer in the old formats.

What a request means is decided by the pure functions of :mod:`consumer.legacy`; this module
only talks to the network, the broker and the domain registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractRobustConnection
from aiohttp import web

from consumer import legacy, topology
from consumer.authorization import Authority, Authorizer, VerifiedKeys, broker_login
from consumer.domain_store import DomainStore
from consumer.errors import ConfigurationError, GatewayRequestError, MailbusError
from consumer.logging import get_logger
from consumer.publish import Replies, job_message, jobs_exchange
from consumer.settings import Settings
from consumer.status import start_of_day, today_of
from consumer.store import JobStore, utcnow
from consumer.topology import SEND_KEY, SEND_NOW_KEY, Names

log = get_logger(__name__)
REST_PATHS = ("/api/mail", "/api/mail/new")
# A daemon client that connects and says nothing is let go after this long.
IDLE_SECONDS = 30.0
_READ_SIZE = 64 * 1024


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
    """A daemon request longer than ``MAILBUS_GATEWAY_MAX_REQUEST_BYTES``."""


async def read_request(reader: asyncio.StreamReader, limit: int) -> bytes:
    """One daemon request: up to its newline, a whole JSON object, or the end of input."""
    buffer = b""
    while True:
        chunk = await reader.read(_READ_SIZE)
        if not chunk:
            return buffer
        buffer += chunk
        request = legacy.complete_request(buffer)
        if request is not None and len(request) <= limit:
            return request
        if len(buffer) > limit:
            raise TooLargeError(f"request larger than {limit} bytes")


class Gateway:
    """Publishes the jobs of old-style requests; one broker connection for every request."""

    def __init__(
        self,
        settings: Settings,
        exchange: AbstractExchange,
        replies: Replies,
        jobs: JobStore,
    ) -> None:
        self.settings = settings
        self.exchange = exchange
        self.replies = replies
        self.jobs = jobs
        self.authorizer = Authorizer(DomainStore(jobs.database), open_domains=settings.open_domains)
        self.user = broker_login(settings.amqp_url.get_secret_value())
        self.limit = settings.gateway_max_request_bytes
        self.waited = settings.gateway_wait_seconds
        self._passwords = VerifiedKeys()
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    @contextlib.asynccontextmanager
    async def connected(cls, settings: Settings) -> AsyncIterator[Gateway]:
        """A gateway with its broker connection and domain registry, closed on exit."""
        connection: AbstractRobustConnection = await aio_pika.connect_robust(
            settings.amqp_url.get_secret_value()
        )
        async with connection, JobStore.connect(settings) as jobs:
            channel = await connection.channel(publisher_confirms=True)
            names = Names(settings.prefix)
            # As a worker does: a gateway started first must not publish into nothing.
            await topology.declare(channel, names, settings.delivery_limit)
            replies = Replies(channel)
            await replies.start()
            exchange = await jobs_exchange(channel, names)
            yield cls(settings, exchange, replies, jobs)

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
        try:
            if request.content_type == "application/json":
                raw = await request.json()
                fields = raw if isinstance(raw, dict) else {}
            else:
                fields = dict(await request.post())
        except web.HTTPRequestEntityTooLarge:
            reply = legacy.rest_reply("failed", f"request larger than {self.limit} bytes")
            return web.json_response(reply, status=413)
        except (ValueError, RecursionError):  # RecursionError: hostile nesting
            return web.json_response(legacy.rest_reply("failed", "body is not valid JSON"))
        texts = {k: v for k, v in fields.items() if isinstance(v, str)}
        try:
            reply = await self._rest_answer(texts)
        except (MailbusError, aio_pika.exceptions.AMQPException) as exc:
            log.warning("gateway.unavailable", gateway="rest", error=str(exc))
            reply = legacy.rest_reply("failed", f"mail service unavailable: {exc}")
            return web.json_response(reply, status=503)
        log.info("gateway.request", gateway="rest", status=reply["status"], id=reply.get("id"))
        return web.json_response(reply)

    async def _rest_answer(self, fields: Mapping[str, str]) -> dict[str, Any]:
        try:
            mail = legacy.rest_mail(fields)
            job = legacy.checked_job(mail.job)
        except GatewayRequestError as exc:
            return legacy.rest_reply("failed", str(exc))
        if await self.authorizer.domain(job.domain) is None:
            return legacy.rest_reply("failed", "Invalid Domain")
        if await self.authorizer.refusal(job, Authority()) is not None:
            return legacy.rest_reply("failed", "invalid domain key")
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
        try:
            try:
                async with asyncio.timeout(IDLE_SECONDS):
                    request = await read_request(reader, self.limit)
            except TooLargeError as exc:
                writer.write(legacy.daemon_reply("error", str(exc), "invalid payload"))
            except TimeoutError:
                return
            else:
                if request.strip():
                    writer.write(await self._daemon_answer(request))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._tasks.discard(task)

    async def _daemon_answer(self, line: bytes) -> bytes:
        try:
            request = legacy.daemon_request(line)
        except GatewayRequestError as exc:
            return legacy.daemon_reply("error", None, str(exc))
        if not await self._authenticated(request.auth):
            log.warning("gateway.unauthorized", gateway="daemon", request=request.name)
            return legacy.daemon_reply("error", None, "unauthorized request")
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
            )
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
        server: asyncio.Server | None = None
        try:
            if rest is not None:
                runner = web.AppRunner(gateway.rest_app(), access_log=None)
                await runner.setup()
                await web.TCPSite(runner, rest.host, rest.port).start()
                ports["rest"] = runner.addresses[0][1]
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
            if server is not None:
                server.close()
            await gateway.finish()
            if runner is not None:
                await runner.cleanup()
