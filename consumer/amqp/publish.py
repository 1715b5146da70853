"""Publishing jobs: the producer helper used by the CLI, the examples and application code."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange

from consumer.clock import utcnow
from consumer.core.headers import DELAY_HEADER
from consumer.core.message import json_body
from consumer.core.names import DIRECT_REPLY_TO, SEND_KEY, Names


def job_message(
    job: Mapping[str, Any],
    *,
    job_id: str | None = None,
    delay_ms: int | None = None,
    reply_to: str | None = None,
    correlation_id: str | None = None,
) -> aio_pika.Message:
    """An AMQP message carrying ``job`` as the v1 contract asks (JSON, persistent, id set)."""
    job_id = job_id or str(job.get("id") or uuid.uuid4())
    headers: dict[str, Any] = {}
    if delay_ms is not None:
        headers[DELAY_HEADER] = delay_ms
    return aio_pika.Message(
        json_body(job),
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=job_id,
        headers=headers,
        reply_to=reply_to,
        correlation_id=correlation_id,
        timestamp=utcnow(),  # where end-to-end latency is measured from
    )


async def jobs_exchange(channel: AbstractChannel, names: Names) -> AbstractExchange:
    """The topic exchange jobs are published to.

    No round trip to the broker: a missing exchange shows when publishing to it fails.
    """
    return await channel.get_exchange(names.exchange, ensure=False)


async def publish_job(
    channel: AbstractChannel,
    job: Mapping[str, Any],
    *,
    names: Names | None = None,
    routing_key: str = SEND_KEY,
    job_id: str | None = None,
    delay_ms: int | None = None,
) -> str:
    """Publish one job and return its id once the broker has confirmed it.

    ``channel`` must have publisher confirms on (aio-pika's default). Publishing with the
    same ``job_id`` again sends the mail once.
    """
    message = job_message(job, job_id=job_id, delay_ms=delay_ms)
    exchange = await jobs_exchange(channel, names or Names())
    await exchange.publish(message, routing_key=routing_key, mandatory=True)
    assert message.message_id is not None  # job_message always sets it
    return message.message_id


class Replies:
    """Answers to messages published with RabbitMQ's direct reply-to, on one channel.

    The broker allows one reply consumer per channel, so a single consumer hands each answer
    to the request with its ``correlation_id``; any number of requests may wait at once.
    """

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        self._waiting: dict[str, asyncio.Future[bytes]] = {}
        self._tag: str | None = None

    async def start(self) -> None:
        """Consume the reply pseudo-queue; it must exist before a request is published."""
        replies = await self.channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        self._tag = await replies.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, reply: aio_pika.abc.AbstractIncomingMessage) -> None:
        waiting = self._waiting.get(reply.correlation_id or "")
        if waiting is not None and not waiting.done():
            waiting.set_result(reply.body)

    async def ask(
        self, exchange: AbstractExchange, message: aio_pika.Message, routing_key: str
    ) -> asyncio.Future[bytes]:
        """Publish ``message`` and, once the broker has confirmed it, return the future of
        its answer's body: a publish that fails raises, and only the wait for the answer is
        left to bound (:func:`asyncio.timeout`; cancelling the future stops waiting).
        """
        message.reply_to = DIRECT_REPLY_TO
        correlation_id = message.correlation_id = message.correlation_id or str(uuid.uuid4())
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = answer
        answer.add_done_callback(lambda _: self._waiting.pop(correlation_id, None))
        try:
            await exchange.publish(message, routing_key=routing_key, mandatory=True)
        except BaseException:
            answer.cancel()
            raise
        return answer

    async def stop(self) -> None:
        """Stop consuming replies (a no-op when the channel is already closed)."""
        if self._tag is not None and not self.channel.is_closed:
            replies = await self.channel.get_queue(DIRECT_REPLY_TO, ensure=False)
            await replies.cancel(self._tag)
        self._tag = None


async def publish_and_wait(
    channel: AbstractChannel,
    exchange: AbstractExchange,
    message: aio_pika.Message,
    routing_key: str,
) -> bytes:
    """Publish ``message`` with a direct reply-to and return the body of the answer.

    It waits as long as it takes: bound it with :func:`asyncio.timeout`.
    """
    replies = Replies(channel)
    await replies.start()
    try:
        return await (await replies.ask(exchange, message, routing_key))
    finally:
        await replies.stop()
