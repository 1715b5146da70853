"""``mailbus webhook serve``: events POSTed to each endpoint of their domain that takes
their type, signed, retried through the delay ladder, every attempt logged.

A process of its own, on a queue of its own (``<prefix>.webhooks``, bound to the events
exchange): a slow or failing receiver costs its prefetch, connections and CPU, never the
workers'; it scales, and stops, apart from them; an install without webhooks runs none
and keeps no queue of events.

One event reaches each endpoint on its own: a failed attempt is copied into the ladder
for that endpoint alone (sealed headers name it, the attempt and when the first was), so
an endpoint that fails never makes another see an event twice. Events of one job are
delivered in the order they came, one at a time; a retry may arrive after later events.
The event is acknowledged once every attempt it caused is settled: delivered, its retry
published, or given up in ``<prefix>.webhooks.dead``. With ``MAILBUS_HTTP_PORT`` set it
serves ``/metrics``, ``/healthz`` and ``/readyz`` as a worker does
(:mod:`consumer.service.health`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aiormq.exceptions import AMQPError, ChannelInvalidStateError

from consumer.amqp import topology
from consumer.amqp.dead_letters import WebhookDeadLetter, read_webhook, replay_copy
from consumer.amqp.outgoing import Outgoing, copy_of
from consumer.clock import utcnow
from consumer.core.headers import (
    EVENT_SEAL_HEADER,
    WEBHOOK_ATTEMPT_HEADER,
    WEBHOOK_HEADER,
    WEBHOOK_SEAL_HEADER,
    WEBHOOK_SINCE_HEADER,
)
from consumer.core.names import Names
from consumer.core.schedule import own_headers, to_epoch_ms
from consumer.core.vocabulary import WebhookDeadReason, WebhookStatus
from consumer.core.webhooks import (
    DESTINATION,
    Attempt,
    Next,
    event_seal_input,
    next_step,
    secret_bytes,
    signed_headers,
    subscribed,
    webhook_id,
)
from consumer.errors import ConfigurationError, StoreUnavailableError
from consumer.logging import get_logger
from consumer.mail.fetch import shown_url
from consumer.mail.webhooks import WebhookPoster
from consumer.service.health import Readiness, consuming_live, serving
from consumer.service.metrics import WebhookMetrics
from consumer.settings import Settings
from consumer.store.documents import Document
from consumer.store.mongo import Mongo
from consumer.vault import Vault

log = get_logger(__name__)
# The largest event body delivered: events carry a job's tags and metadata, both bounded
# by the job contract, far below this.
MAX_EVENT_BYTES = 1024 * 1024
# How long the active endpoints, read from MongoDB, are used before they are read again.
ENDPOINTS_SECONDS = 5.0
# An event whose endpoints could not be read (MongoDB away) comes back this much later.
STORE_RETRY_SECONDS = 5
_BROKER_ERRORS = (AMQPError, ChannelInvalidStateError, ConnectionError)
_GIVEN_UP: dict[WebhookStatus, WebhookDeadReason] = {
    "dead": "expired",
    "refused": "refused",
    "gone": "gone",
}


class InvalidDeliveryError(ValueError):
    """A delivery on the webhooks queue that is no event, or a retry with a broken seal."""


@dataclass(frozen=True)
class Retry:
    """What a retry's copy says: the endpoint, the attempt it is, the first's time (ms)."""

    endpoint: str
    attempt: int
    since_ms: int


def seal_input(retry: Retry, message_id: str, body: bytes) -> bytes:
    """What a retry copy's seal covers: its endpoint, attempt and first time, its event."""
    return f"{retry.endpoint}\0{retry.attempt}\0{retry.since_ms}\0{message_id}\0".encode() + body


def retry_headers(retry: Retry, message_id: str, body: bytes, vault: Vault) -> dict[str, Any]:
    """The headers of a retry's copy: the endpoint, the attempt, the first's time, sealed."""
    return {
        WEBHOOK_HEADER: retry.endpoint,
        WEBHOOK_ATTEMPT_HEADER: retry.attempt,
        WEBHOOK_SINCE_HEADER: retry.since_ms,
        WEBHOOK_SEAL_HEADER: vault.sign(seal_input(retry, message_id, body)),
    }


def read_retry(
    headers: Mapping[str, Any], message_id: str, body: bytes, vault: Vault
) -> Retry | None:
    """The retry a copy's sealed headers name, None for an event as published; raises
    :class:`InvalidDeliveryError` for headers that are malformed or not sealed by us.
    """
    endpoint = headers.get(WEBHOOK_HEADER)
    if endpoint is None:
        return None
    attempt, since, seal = (
        headers.get(name)
        for name in (WEBHOOK_ATTEMPT_HEADER, WEBHOOK_SINCE_HEADER, WEBHOOK_SEAL_HEADER)
    )
    if not (
        isinstance(endpoint, str)
        and len(endpoint) <= 64
        and isinstance(attempt, int)
        and 1 < attempt <= 100_000
        and isinstance(since, int)
        and isinstance(seal, str)
        and len(seal) <= 128
    ):
        raise InvalidDeliveryError("malformed webhook retry headers")
    retry = Retry(endpoint, attempt, since)
    if not vault.verify(seal_input(retry, message_id, body), seal):
        raise InvalidDeliveryError("webhook retry headers without a valid seal")
    return retry


def message_id_of(message: AbstractIncomingMessage) -> str:
    """The id an event goes by: its message id (a worker's events have one), else the
    SHA-256 of its body. ``webhook-id`` and retry seals are made from it.
    """
    return message.message_id or hashlib.sha256(message.body).hexdigest()


def given_up(message: AbstractIncomingMessage) -> WebhookDeadLetter:
    """What a dead letter of ``<prefix>.webhooks.dead`` says, named by the ``webhook-id``
    its endpoint was sent (or by the event's id when it names no endpoint).
    """
    endpoint = (message.headers or {}).get(WEBHOOK_HEADER)
    event_id = message_id_of(message)
    named = webhook_id(event_id, endpoint) if isinstance(endpoint, str) else event_id
    return read_webhook(message, named)


def replayed_copy(
    message: AbstractIncomingMessage, attempts: int, vault: Vault, now_ms: int
) -> aio_pika.Message:
    """The copy of a given-up delivery that ``mailbus webhook replay`` puts back on the
    webhooks queue: without its cause of death; for the endpoint it names, a retry sealed
    anew, its attempt the one after ``attempts`` and its maximum age counted from
    ``now_ms``, so that it gets a whole round of attempts again. One that names no
    endpoint (the broker gave up on the event itself) goes back as the event.
    """
    copy = replay_copy(message)
    headers = {
        name: value
        for name, value in (copy.headers or {}).items()
        if not name.startswith("x-mailbus-webhook")
    }
    endpoint = (message.headers or {}).get(WEBHOOK_HEADER)
    if isinstance(endpoint, str):
        retry = Retry(endpoint, max(attempts, 1) + 1, now_ms)
        headers.update(retry_headers(retry, message_id_of(message), message.body, vault))
    copy.headers = headers
    return copy


def check_sealed(
    headers: Mapping[str, Any], message_id: str | None, body: bytes, vault: Vault
) -> None:
    """Raise :class:`InvalidDeliveryError` unless an event as published carries the seal
    mailbus puts on its own (:meth:`consumer.amqp.outgoing.Outgoing.event`): whoever may
    publish to the events exchange must not have an event POSTed in a domain's name.
    """
    seal = headers.get(EVENT_SEAL_HEADER)
    if not (
        message_id
        and isinstance(seal, str)
        and len(seal) <= 128
        and vault.verify(event_seal_input(message_id, body), seal)
    ):
        raise InvalidDeliveryError(
            "an event without a valid seal: not published by mailbus (or by a worker "
            "without MAILBUS_SECRET_KEY)"
        )


def event_of(body: bytes) -> dict[str, Any]:
    """The event a delivery carries; :class:`InvalidDeliveryError` when it is none."""
    if len(body) > MAX_EVENT_BYTES:
        raise InvalidDeliveryError(f"an event of {len(body)} bytes is over {MAX_EVENT_BYTES}")
    try:
        event = json.loads(body)
    except ValueError:
        raise InvalidDeliveryError("the body is not JSON") from None
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        raise InvalidDeliveryError("the body is not an event (no 'event' field)")
    return event


class WebhookService:
    """Consumes ``<prefix>.webhooks`` and delivers each event to its endpoints."""

    def __init__(
        self,
        settings: Settings,
        mongo: Mongo,
        vault: Vault,
        poster: WebhookPoster,
        *,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        """``vault`` opens the endpoints' secrets and seals retry copies; ``jitter`` spreads
        retries (a number in [0, 1)).
        """
        self.settings = settings
        self.jitter = jitter
        self.names = Names(settings.prefix)
        self.mongo = mongo
        self.vault = vault
        self.poster = poster
        self._outgoing: Outgoing | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # The last delivery of each job under way: the next one waits for it.
        self._tails: dict[str, asyncio.Future[None]] = {}
        self._reading = asyncio.Lock()
        self._read_at: float | None = None
        self._by_domain: dict[str, list[Document]] = {}
        self._connection: AbstractRobustConnection | None = None
        self._consuming = False
        self.metrics = WebhookMetrics(lambda: len(self._tasks))
        self.http_port: int | None = None  # once serving (MAILBUS_HTTP_PORT)

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookService:
        """The service on ``settings``; MAILBUS_SECRET_KEY is required."""
        poster = WebhookPoster(
            settings.webhook_timeout, allow_private=settings.webhook_allow_private
        )
        return cls(settings, Mongo.connect(settings), Vault.from_settings(settings), poster)

    async def run(self, stop: asyncio.Event, started: asyncio.Event | None = None) -> None:
        """Deliver until ``stop`` is set, then finish the deliveries under way (within
        MAILBUS_DRAIN_TIMEOUT) and close everything; ``started`` is set once consuming.
        Serve the HTTP endpoints meanwhile when ``MAILBUS_HTTP_PORT`` is set: ready while
        consuming on a live RabbitMQ connection, with MongoDB answering.
        """
        port = self.settings.http_port
        if port is None:
            await self._run(stop, started)
            return
        readiness = Readiness(asyncio.get_running_loop(), self._ready, self.mongo.jobs.ping)
        with serving(
            self.settings.http_host,
            port,
            self.metrics.registry,
            readiness,
            max_connections=self.settings.http_max_connections,
            read_timeout=self.settings.http_read_timeout,
        ) as server:
            self.http_port = server.server_port
            await self._run(stop, started)

    def _ready(self) -> bool:
        """Consuming, on a connection that is up (read from the HTTP thread)."""
        return consuming_live(self._consuming, self._connection)

    async def _run(self, stop: asyncio.Event, started: asyncio.Event | None) -> None:
        url = self.settings.amqp_url.get_secret_value()
        try:
            await self.mongo.webhooks.ensure_indexes()
            connection = await aio_pika.connect_robust(
                url, client_properties={"connection_name": "mailbus webhooks"}
            )
        except BaseException:
            await self._close()
            raise
        self._connection = connection
        try:
            channel = await connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=self.settings.webhook_prefetch)
            await topology.declare(channel, self.names, self.settings.delivery_limit)
            queue = await topology.declare_webhooks(
                channel, self.names, self.settings.delivery_limit
            )
            self._outgoing = await Outgoing.open(
                channel, self.names, dead_letter_days=self.settings.dead_letter_days
            )
            tag = await queue.consume(self._on_message)
            log.info(
                "webhooks.consuming", queue=queue.name, prefetch=self.settings.webhook_prefetch
            )
            self._consuming = True
            if started is not None:
                started.set()
            await stop.wait()
            self._consuming = False
            with contextlib.suppress(*_BROKER_ERRORS):
                await queue.cancel(tag)
            if self._tasks:
                _, pending = await asyncio.wait(
                    set(self._tasks), timeout=self.settings.drain_timeout
                )
                for task in pending:  # their events go back to the queue with the channel
                    task.cancel()
        finally:
            await connection.close()
            await self._close()
            log.info("webhooks.stopped")

    async def _close(self) -> None:
        await self.poster.close()
        await self.mongo.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            event: dict[str, Any] | InvalidDeliveryError = event_of(message.body)
        except InvalidDeliveryError as exc:
            event = exc
        # Keyed here, in the order deliveries arrive, so that one job's events go in order.
        key = str(event.get("id")) if isinstance(event, dict) else None
        self._spawn(self._in_order(key, self._settled(message, event)))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _in_order(self, key: str | None, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` after the last one of the same ``key`` has finished."""
        if key is None:
            await work
            return
        before = self._tails.get(key)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tails[key] = done
        try:
            if before is not None:
                # Shielded: this one cancelled while it waits must not cancel the future
                # of the one before, which then could not say it has finished.
                await asyncio.shield(before)
            await work
        finally:
            work.close()  # a no-op once it ran; one cancelled while waiting never starts
            done.set_result(None)
            if self._tails.get(key) is done:
                del self._tails[key]

    async def _settled(
        self, message: AbstractIncomingMessage, event: dict[str, Any] | InvalidDeliveryError
    ) -> None:
        """Handle one delivery and acknowledge it; what goes wrong returns it to the queue
        (its delivery limit bounds the returns), never holds it.
        """
        structlog.contextvars.clear_contextvars()
        try:
            await self._handle(message, event)
            await message.ack()
        except Exception:
            log.exception("webhooks.delivery_crashed")
            with contextlib.suppress(*_BROKER_ERRORS):
                await message.nack(requeue=True)

    async def _handle(
        self, message: AbstractIncomingMessage, event: dict[str, Any] | InvalidDeliveryError
    ) -> None:
        headers = message.headers or {}
        message_id = message_id_of(message)
        try:
            if isinstance(event, InvalidDeliveryError):
                raise event
            retry = read_retry(headers, message_id, message.body, self.vault)
            if retry is None:
                check_sealed(headers, message.message_id, message.body, self.vault)
        except InvalidDeliveryError as exc:
            log.warning("webhooks.invalid", error=str(exc))
            await self._out().webhook_dead_letter(
                message, headers, self.names.webhooks_dead, "invalid", str(exc), 0
            )
            self.metrics.count("given_up", "invalid")
            return
        domain = event.get("domain")
        if not isinstance(domain, str):
            return  # a job that never parsed has no domain, so no endpoints
        structlog.contextvars.bind_contextvars(job_id=str(event.get("id")), domain=domain)
        try:
            endpoints = await self._endpoints(domain, event["event"], retry)
        except StoreUnavailableError as exc:
            log.warning("webhooks.store_unavailable", error=str(exc))
            await self._out().after(copy_of(message, headers), STORE_RETRY_SECONDS, DESTINATION)
            return
        await asyncio.gather(
            *(self._deliver(message, event, message_id, endpoint, retry) for endpoint in endpoints)
        )

    async def _endpoints(self, domain: str, event_type: str, retry: Retry | None) -> list[Document]:
        if retry is None:
            endpoints = (await self._active()).get(domain.lower(), [])
            return [e for e in endpoints if subscribed(e.get("events", []), event_type)]
        endpoint = await self.mongo.webhooks.get(retry.endpoint)
        if endpoint is None or not endpoint.get("active", False):
            await self._note(
                {"endpoint": retry.endpoint, "domain": domain, "event": event_type},
                retry.attempt,
                "removed",
                Attempt(None, "the endpoint was removed or turned off"),
            )
            return []
        return [endpoint]

    async def _active(self) -> dict[str, list[Document]]:
        """The active endpoints by domain, read again when ENDPOINTS_SECONDS old: one query
        every few seconds, whatever the rate of events, rather than one per event on the
        database the workers send through.
        """
        async with self._reading:
            now = time.monotonic()
            if self._read_at is None or now - self._read_at >= ENDPOINTS_SECONDS:
                by_domain: dict[str, list[Document]] = {}
                for endpoint in await self.mongo.webhooks.active():
                    by_domain.setdefault(endpoint["domain"], []).append(endpoint)
                self._by_domain, self._read_at = by_domain, now
            return self._by_domain

    async def _deliver(
        self,
        message: AbstractIncomingMessage,
        event: dict[str, Any],
        message_id: str,
        endpoint: Document,
        retry: Retry | None,
    ) -> None:
        """One attempt at one endpoint, and what follows it: a retry copy or a dead letter."""
        now = utcnow()
        number = retry.attempt if retry else 1
        since_ms = retry.since_ms if retry else to_epoch_ms(now)
        msg_id = webhook_id(message_id, endpoint["_id"])
        try:
            key = secret_bytes(self.vault.decrypt(endpoint["secret"]))
        except (ConfigurationError, ValueError) as exc:
            attempt = Attempt(None, f"the endpoint's secret cannot be used: {exc}", refused=True)
        else:
            signed = signed_headers(key, msg_id, int(now.timestamp()), message.body)
            began = time.monotonic()
            attempt = await self.poster.post(endpoint["url"], message.body, signed)
            self.metrics.attempt_seconds.observe(time.monotonic() - began)
        age = (to_epoch_ms(utcnow()) - since_ms) / 1000
        step = next_step(
            attempt,
            number,
            age,
            base=self.settings.webhook_retry_base_delay,
            maximum=self.settings.webhook_retry_max_delay,
            max_age=self.settings.webhook_max_age,
            jitter=self.jitter(),
        )
        entry = {
            "endpoint": endpoint["_id"],
            "domain": endpoint["domain"],
            "url": shown_url(endpoint["url"]),
            "event": event["event"],
            "job": event.get("id"),
            "webhook_id": msg_id,
        }
        following = Retry(endpoint["_id"], number + 1, since_ms)
        await self._follow(message, message_id, entry, following, step, attempt)
        await self._note(entry, number, step.status, attempt, step.retry_in)

    async def _follow(
        self,
        message: AbstractIncomingMessage,
        message_id: str,
        entry: dict[str, Any],
        retry: Retry,
        step: Next,
        attempt: Attempt,
    ) -> None:
        """Publish what follows an attempt: the retry's sealed copy, or the dead letter;
        count it.
        """
        headers = {
            name: value
            for name, value in own_headers(message.headers or {}).items()
            if not name.startswith("x-mailbus-webhook")
        }
        headers[WEBHOOK_HEADER] = retry.endpoint
        if step.retry_in is not None:
            headers.update(retry_headers(retry, message_id, message.body, self.vault))
            await self._out().after(
                copy_of(message, headers),
                round(step.retry_in),
                DESTINATION,
            )
            self.metrics.count("failed")
            return
        reason = _GIVEN_UP.get(step.status)
        if reason is not None:
            if step.status == "gone":
                try:
                    await self.mongo.webhooks.deactivate(entry["endpoint"], "410 Gone")
                except StoreUnavailableError as exc:  # it answers 410 again next time
                    log.warning("webhooks.not_turned_off", error=str(exc))
            log.warning("webhooks.given_up", endpoint=entry["endpoint"], reason=reason)
            await self._out().webhook_dead_letter(
                message,
                headers,
                self.names.webhooks_dead,
                reason,
                attempt.error or f"HTTP {attempt.status}",
                retry.attempt - 1,
            )
            self.metrics.count("given_up", reason)
        elif step.status == "delivered":
            self.metrics.count("delivered")

    async def _note(
        self,
        entry: dict[str, Any],
        number: int,
        status: WebhookStatus,
        attempt: Attempt,
        retry_in: float | None = None,
    ) -> None:
        """Log an attempt, in MongoDB and in the process log; a log MongoDB cannot take
        is lost, never the delivery.
        """
        record = {
            **entry,
            "attempt": number,
            "status": status,
            "http": attempt.status,
            "error": attempt.error,
            "retry_in": retry_in,
        }
        # structlog's own "event" is the log line's name; the domain is bound already.
        shown = {k: v for k, v in record.items() if k not in ("event", "domain")}
        log.info("webhooks.attempt", type=record["event"], **shown)
        try:
            await self.mongo.webhooks.log(record, self.settings.webhook_log_days)
        except StoreUnavailableError as exc:
            log.warning("webhooks.log_lost", error=str(exc))

    def _out(self) -> Outgoing:
        assert self._outgoing is not None  # consuming implies the exchanges are bound
        return self._outgoing
