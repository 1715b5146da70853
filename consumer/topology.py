"""AMQP names and their idempotent declaration (DESIGN.md §3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue


@dataclass(frozen=True)
class Names:
    """Every exchange, queue and routing key, derived from one prefix."""

    prefix: str = "mailbus"

    @property
    def exchange(self) -> str:
        """Topic exchange producers publish jobs to."""
        return self.prefix

    @property
    def send_queue(self) -> str:
        """Queue of ordinary jobs (routing key ``send``)."""
        return f"{self.prefix}.send"

    @property
    def send_now_queue(self) -> str:
        """Queue of urgent jobs (routing key ``send.now``), consumed alongside ``send``."""
        return f"{self.prefix}.send.now"

    @property
    def dead(self) -> str:
        """Fanout exchange and quorum queue of dead letters."""
        return f"{self.prefix}.dead"

    @property
    def events(self) -> str:
        """Topic exchange of ``mail.*`` events; no queue is bound by default."""
        return f"{self.prefix}.events"


SEND_KEY = "send"
SEND_NOW_KEY = "send.now"


def send_queue_arguments(names: Names, delivery_limit: int) -> dict[str, Any]:
    """Arguments of the send queues: quorum, at-least-once dead-lettering, bounded redelivery."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": names.dead,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": delivery_limit,
    }


@dataclass(frozen=True)
class Topology:
    """The declared objects a worker publishes to and consumes from."""

    exchange: AbstractExchange
    dead: AbstractExchange
    events: AbstractExchange
    consume: tuple[tuple[AbstractQueue, str], ...]


async def declare(channel: AbstractChannel, names: Names, delivery_limit: int) -> Topology:
    """Declare every exchange, queue and binding; safe to run again with the same arguments.

    Returns the objects, with each send queue paired with the routing key that feeds it.
    """
    dead_exchange = await channel.declare_exchange(
        names.dead, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dead_queue = await channel.declare_queue(
        names.dead, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead_queue.bind(dead_exchange, routing_key="")
    events = await channel.declare_exchange(names.events, aio_pika.ExchangeType.TOPIC, durable=True)
    exchange = await channel.declare_exchange(
        names.exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    arguments = send_queue_arguments(names, delivery_limit)
    consume = []
    for queue_name, key in ((names.send_now_queue, SEND_NOW_KEY), (names.send_queue, SEND_KEY)):
        queue = await channel.declare_queue(queue_name, durable=True, arguments=arguments)
        await queue.bind(exchange, routing_key=key)
        consume.append((queue, key))
    return Topology(exchange, dead_exchange, events, tuple(consume))
