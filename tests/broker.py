"""Test helpers that talk to the real broker: raw publishing and reading queues."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from consumer.amqp.publish import publish_and_wait
from consumer.core.names import Names


async def publish_raw(
    channel: AbstractChannel,
    names: Names,
    body: bytes,
    *,
    message_id: str | None = None,
    routing_key: str = "send",
    headers: dict[str, Any] | None = None,
) -> None:
    """Publish bytes as any AMQP client would, without mailbus's helper."""
    exchange = await channel.get_exchange(names.exchange)
    message = aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
        headers=headers or {},
    )
    await exchange.publish(message, routing_key=routing_key)


def job(**fields: Any) -> dict[str, Any]:
    """A valid v1 job body, with ``fields`` overriding the defaults."""
    body: dict[str, Any] = {
        "domain": "example.com",
        "from": {"email": "sender@example.com", "name": "Sender"},
        "to": ["rcpt@example.org"],
        "subject": "Hello",
        "text": "Hello there",
    }
    body.update(fields)
    return body


def encode(body: dict[str, Any]) -> bytes:
    """A job body as UTF-8 JSON."""
    return json.dumps(body, ensure_ascii=False).encode()


async def take(
    channel: AbstractChannel, queue_name: str, count: int
) -> list[AbstractIncomingMessage]:
    """Wait until ``count`` messages can be taken from ``queue_name`` (bound with a timeout)."""
    queue = await channel.get_queue(queue_name, ensure=False)
    got: list[AbstractIncomingMessage] = []
    while len(got) < count:
        message = await queue.get(no_ack=True, fail=False)
        if message is None:
            await asyncio.sleep(0.05)
            continue
        got.append(message)
    return got


async def depth(channel: AbstractChannel, queue_name: str) -> int:
    """The number of ready messages in ``queue_name``."""
    queue = await channel.declare_queue(queue_name, passive=True)
    return queue.declaration_result.message_count or 0


async def listen_events(channel: AbstractChannel, names: Names) -> str:
    """Bind a private queue to every ``mail.*`` event and return its name."""
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(names.events, routing_key="mail.#")
    return queue.name


async def drain_events(channel: AbstractChannel, queue_name: str) -> list[tuple[str, Any]]:
    """Every event waiting in ``queue_name`` as (routing key, decoded body)."""
    queue = await channel.get_queue(queue_name, ensure=False)
    events = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        events.append((message.routing_key or "", json.loads(message.body)))
    return events


async def control(channel: AbstractChannel, names: Names, request: dict[str, Any]) -> Any:
    """Publish a control message as a producer would and return the worker's JSON answer."""
    exchange = await channel.get_exchange(names.exchange, ensure=False)
    message = aio_pika.Message(encode(request), content_type="application/json", delivery_mode=2)
    async with asyncio.timeout(20):
        return json.loads(await publish_and_wait(channel, exchange, message, "control"))


async def until(check: Callable[[], Awaitable[bool]], seconds: float = 10) -> None:
    """Poll ``check`` until it is true; fails with TimeoutError after ``seconds``."""
    async with asyncio.timeout(seconds):
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)
