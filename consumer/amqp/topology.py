"""Declaring the exchanges and queues named in :mod:`consumer.core.names`, idempotently
(consumer/README.md, "AMQP contract").
"""

from __future__ import annotations

from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from consumer.core import ladder
from consumer.core.names import (
    CONTROL_KEY,
    DUE_KEY,
    SEND_KEY,
    SEND_NOW_KEY,
    Names,
    consumed_queue_arguments,
    ladder_queue_arguments,
    webhooks_queue_arguments,
)
from consumer.core.webhooks import DESTINATION as WEBHOOK_DESTINATION


@dataclass(frozen=True)
class Topology:
    """The declared objects a worker publishes to and consumes from.

    ``consume`` holds the queues of jobs, ``send.now`` first, then the jobs back from the
    ladder, then ``send``.
    """

    exchange: AbstractExchange
    dead: AbstractExchange
    events: AbstractExchange
    ladder: AbstractExchange
    consume: tuple[AbstractQueue, ...]
    control: AbstractQueue


async def declare(channel: AbstractChannel, names: Names, delivery_limit: int) -> Topology:
    """Declare every exchange, queue and binding; safe to run again with the same arguments."""
    topic = aio_pika.ExchangeType.TOPIC
    dead_exchange = await channel.declare_exchange(
        names.dead, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dead_queue = await channel.declare_queue(
        names.dead, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead_queue.bind(dead_exchange, routing_key="")
    events = await channel.declare_exchange(names.events, topic, durable=True)
    exchange = await channel.declare_exchange(names.exchange, topic, durable=True)
    deliver = await channel.declare_exchange(names.deliver, topic, durable=True)
    arguments = consumed_queue_arguments(names, delivery_limit)
    consume = []
    for queue_name, key in (
        (names.send_now_queue, SEND_NOW_KEY),
        (names.due_queue, DUE_KEY),
        (names.send_queue, SEND_KEY),
    ):
        queue = await channel.declare_queue(queue_name, durable=True, arguments=arguments)
        if key != DUE_KEY:  # only the ladder publishes there
            await queue.bind(exchange, routing_key=key)
        # send and send.now stay bound at the ladder's foot for copies made before the
        # due queue was.
        await queue.bind(deliver, routing_key=ladder.deliver_pattern(key))
        consume.append(queue)
    control = await channel.declare_queue(names.control_queue, durable=True, arguments=arguments)
    await control.bind(exchange, routing_key=CONTROL_KEY)
    below = deliver
    for level in range(ladder.LEVELS):
        level_exchange = await channel.declare_exchange(names.delay(level), topic, durable=True)
        queue = await channel.declare_queue(
            names.delay(level), durable=True, arguments=ladder_queue_arguments(names, level)
        )
        await queue.bind(level_exchange, routing_key=ladder.parked_pattern(level))
        await below.bind(level_exchange, routing_key=ladder.passed_pattern(level))
        below = level_exchange
    return Topology(exchange, dead_exchange, events, below, tuple(consume), control)


async def declare_webhooks(
    channel: AbstractChannel, names: Names, delivery_limit: int
) -> AbstractQueue:
    """Declare the webhooks queue, bound to every ``mail.*`` event and to the retries the
    ladder brings back, and its dead-letter queue; after :func:`declare`. Returns the queue.
    """
    # Reached through the default exchange, by its name: no exchange of its own.
    await channel.declare_queue(
        names.webhooks_dead, durable=True, arguments={"x-queue-type": "quorum"}
    )
    queue = await channel.declare_queue(
        names.webhooks_queue,
        durable=True,
        arguments=webhooks_queue_arguments(names, delivery_limit),
    )
    await queue.bind(names.events, routing_key="mail.#")
    await queue.bind(names.deliver, routing_key=ladder.deliver_pattern(WEBHOOK_DESTINATION))
    return queue
