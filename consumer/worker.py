"""The consume loop: one task per delivery, one place that settles it, a drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import uuid
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from aiormq.exceptions import AMQPError, ChannelInvalidStateError

from consumer import topology
from consumer.errors import StoreUnavailableError
from consumer.events import event_for, reply_for
from consumer.logging import get_logger
from consumer.outboxes import outbox_from_url
from consumer.pipeline import Context, Crashed, Dead, Later, Outcome, Pipeline, Sent, Skip
from consumer.publish import json_body
from consumer.schedule import DELAY_HEADER, DUE_HEADER, to_epoch_ms
from consumer.settings import Settings, redact_url
from consumer.store import JobStore, utcnow

log = get_logger(__name__)
REASON_HEADER = "x-mailbus-reason"
ERROR_HEADER = "x-mailbus-error"
ATTEMPTS_HEADER = "x-mailbus-attempts"
CODE_HEADER = "x-mailbus-smtp-code"
RECONNECT_INTERVAL = 2.0
_BROKER_ERRORS = (AMQPError, ChannelInvalidStateError, ConnectionError)


class Worker:
    """Consumes the send queues and carries each job's outcome out on the broker."""

    def __init__(self, settings: Settings, store: JobStore | None = None) -> None:
        self.settings = settings
        self.names = topology.Names(settings.prefix)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.store = store or JobStore.connect(settings)
        outbox = None
        if settings.default_smtp_url is not None:
            outbox = outbox_from_url(
                settings.default_smtp_url.get_secret_value(), timeout=settings.smtp_timeout
            )
        self.pipeline = Pipeline(settings, self.store, outbox, self.worker_id)
        self._tasks: set[asyncio.Task[None]] = set()
        self._draining = asyncio.Event()
        self._topology: topology.Topology | None = None
        self._channel: AbstractChannel | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then drain and close everything."""
        connection = await self._connect(stop)
        if connection is None:
            return
        try:
            channel = await connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=self.settings.prefetch)
            self._channel = channel
            self._topology = await topology.declare(
                channel, self.names, self.settings.delivery_limit
            )
            if not await self._wait_for_store(stop):
                return
            consumers = []
            for queue, key in self._topology.consume:
                tag = await queue.consume(functools.partial(self._on_message, key))
                consumers.append((queue, tag))
            log.info(
                "worker.consuming",
                worker=self.worker_id,
                queues=[q.name for q, _ in self._topology.consume],
                prefetch=self.settings.prefetch,
            )
            await stop.wait()
            log.info("worker.draining", in_flight=len(self._tasks))
            for queue, tag in consumers:
                try:
                    await queue.cancel(tag)
                except _BROKER_ERRORS as exc:
                    log.warning("worker.cancel_failed", error=str(exc))
            await self._drain()
        finally:
            await connection.close()
            await self.store.close()
            log.info("worker.stopped", worker=self.worker_id)

    async def _connect(self, stop: asyncio.Event) -> AbstractRobustConnection | None:
        url = self.settings.amqp_url.get_secret_value()
        while not stop.is_set():
            try:
                return await aio_pika.connect_robust(
                    url,
                    reconnect_interval=RECONNECT_INTERVAL,
                    client_properties={"connection_name": f"mailbus worker {self.worker_id}"},
                )
            except (AMQPError, OSError) as exc:
                log.warning(
                    "worker.broker_unreachable", url=redact_url(url), error=type(exc).__name__
                )
                await _wait(stop, RECONNECT_INTERVAL)
        return None

    async def _wait_for_store(self, stop: asyncio.Event) -> bool:
        while not stop.is_set():
            try:
                await self.store.ensure_indexes()
            except StoreUnavailableError as exc:
                log.warning("worker.store_unreachable", error=str(exc))
                await _wait(stop, RECONNECT_INTERVAL)
            else:
                return True
        return False

    async def _on_message(self, key: str, message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(self._handle(key, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, key: str, message: AbstractIncomingMessage) -> None:
        structlog.contextvars.clear_contextvars()
        try:
            outcome = await self.pipeline.process(
                message.body, message.message_id, message.headers or {}
            )
        except Exception as exc:
            log.exception("job.crashed")
            outcome = Crashed(Context(message.message_id), f"{type(exc).__name__}: {exc}")
        await self._settle(key, message, outcome)

    async def _settle(self, key: str, message: AbstractIncomingMessage, outcome: Outcome) -> None:
        """The one place a delivery is acked or nacked: after everything it caused is durable."""
        try:
            if isinstance(outcome, Crashed):
                await message.nack(requeue=True)
                return
            if isinstance(outcome, Dead):
                await self._dead_letter(message, outcome)
            elif isinstance(outcome, Later):
                await self._hold(outcome)
                await self._republish(key, message, outcome)
            first_sight = DUE_HEADER not in (message.headers or {})
            event = event_for(outcome, first_sight)
            if event is not None:
                await self._publish_event(*event)
            reply = reply_for(outcome)
            if reply is not None and message.reply_to:
                await self._reply(message, reply)
            await message.ack()
        except _BROKER_ERRORS as exc:
            # Unacked, the delivery comes back; the job's claim keeps it from going out twice.
            log.warning("job.settle_failed", error=f"{type(exc).__name__}: {exc}")
            return
        _log_outcome(outcome)

    def _objects(self) -> topology.Topology:
        assert self._topology is not None  # consuming implies declared
        return self._topology

    async def _dead_letter(self, message: AbstractIncomingMessage, outcome: Dead) -> None:
        headers = dict(message.headers or {})
        headers.update(
            {
                REASON_HEADER: outcome.reason,
                ERROR_HEADER: outcome.error[:1000],
                ATTEMPTS_HEADER: outcome.ctx.attempts,
            }
        )
        if outcome.code is not None:
            headers[CODE_HEADER] = outcome.code
        copy = _copy(message, headers)
        await self._objects().dead.publish(copy, routing_key=outcome.reason, mandatory=True)

    async def _hold(self, outcome: Later) -> None:
        """Keep a job that is due soon until its time; a drain cuts the hold short."""
        wait = (outcome.due_at - utcnow()).total_seconds()
        await _wait(self._draining, min(wait, self.settings.max_hold_seconds))

    async def _republish(self, key: str, message: AbstractIncomingMessage, outcome: Later) -> None:
        headers = dict(message.headers or {})
        headers.pop(DELAY_HEADER, None)
        headers[DUE_HEADER] = to_epoch_ms(outcome.due_at)
        await self._objects().exchange.publish(
            _copy(message, headers), routing_key=key, mandatory=True
        )

    async def _publish_event(self, key: str, body: dict[str, Any]) -> None:
        event = aio_pika.Message(
            json_body(body),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=str(uuid.uuid4()),
            type=key,
        )
        await self._objects().events.publish(event, routing_key=key)

    async def _reply(self, message: AbstractIncomingMessage, body: dict[str, Any]) -> None:
        assert self._channel is not None  # set before consuming
        answer = aio_pika.Message(
            json_body(body),
            content_type="application/json",
            correlation_id=message.correlation_id,
        )
        assert message.reply_to is not None
        await self._channel.default_exchange.publish(answer, routing_key=message.reply_to)

    async def _drain(self) -> None:
        """Let in-flight jobs finish (holds end at once), bounded by the drain timeout."""
        self._draining.set()
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=self.settings.drain_timeout)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("worker.drain_timeout", cancelled=len(pending))
            await asyncio.gather(*pending, return_exceptions=True)


def _copy(message: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
    """A persistent copy of ``message`` with new headers (``user_id`` cannot be re-asserted)."""
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds`` or until ``event`` is set, whichever comes first."""
    if seconds <= 0 or event.is_set():
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


def _log_outcome(outcome: Outcome) -> None:
    match outcome:
        case Sent(result=result):
            log.info("job.sent", smtp_code=result.code, refused=len(result.refused))
        case Dead(reason=reason, error=error, code=code):
            log.warning("job.dead", reason=reason, error=error, smtp_code=code)
        case Later(why=why, due_at=due_at, failure=failure):
            log.info(
                "job.later",
                why=why,
                due_at=due_at.isoformat(),
                error=failure.describe() if failure else None,
            )
        case Skip(why=why):
            log.info("job.skipped", why=why)
        case Crashed(error=error):
            log.error("job.requeued_after_crash", error=error)
