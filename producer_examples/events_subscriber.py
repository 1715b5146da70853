"""Print mailbus events as they happen: one line each, the routing key then the JSON body.

    python events_subscriber.py [--keys 'mail.sent' --keys 'mail.failed'] [--queue NAME]

Reads MAILBUS_AMQP_URL and MAILBUS_PREFIX like mailbus itself. Without --queue it listens
on a private queue that lives as long as it runs (events published meanwhile only); with
--queue it uses a durable named queue, so nothing is missed between runs. Bodies follow
consumer/schemas/events-v1.json. Needs aio-pika (pip install aio-pika).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys

import aio_pika


async def subscribe(
    url: str, exchange: str, keys: list[str], queue: str | None, count: int
) -> None:
    """Bind a queue to ``exchange`` for ``keys`` and print each event; stop after ``count``
    (0: never).
    """
    async with await aio_pika.connect_robust(url) as connection:
        channel = await connection.channel()
        if queue:
            events = await channel.declare_queue(
                queue, durable=True, arguments={"x-queue-type": "quorum"}
            )
        else:
            events = await channel.declare_queue(exclusive=True)
        for key in keys:
            await events.bind(exchange, routing_key=key)
        print(f"listening on {exchange} for {', '.join(keys)}", file=sys.stderr, flush=True)
        printed = 0
        async with events.iterator() as deliveries:
            async for message in deliveries:
                async with message.process():
                    print(message.routing_key, message.body.decode(), flush=True)
                printed += 1
                if count and printed >= count:
                    return


def main() -> None:
    """Parse the options and subscribe until interrupted (or --count events)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("MAILBUS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        help="RabbitMQ URL (default: $MAILBUS_AMQP_URL)",
    )
    parser.add_argument(
        "--prefix", default=os.environ.get("MAILBUS_PREFIX", "mailbus"), help="MAILBUS_PREFIX"
    )
    parser.add_argument(
        "--keys",
        action="append",
        help="routing keys to follow: mail.sent, mail.failed, mail.dead, mail.deferred, "
        "mail.scheduled, mail.cancelled, or patterns like mail.# (default: mail.#)",
    )
    parser.add_argument("--queue", help="a durable queue of your own, so no event is missed")
    parser.add_argument("--count", type=int, default=0, help="exit after this many events")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how it is meant to end
        asyncio.run(
            subscribe(
                args.url, f"{args.prefix}.events", args.keys or ["mail.#"], args.queue, args.count
            )
        )


if __name__ == "__main__":
    main()
