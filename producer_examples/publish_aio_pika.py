"""Publish one mail job with aio-pika: publisher confirms, a persistent message, the job id
as message_id, and optionally ``x-delay`` to send it later.

    python publish_aio_pika.py --to someone@example.org --subject Hi --text Hello [--delay-ms 60000]

Reads MAILBUS_AMQP_URL and MAILBUS_PREFIX like mailbus itself; prints the job id once the
broker has confirmed the message. Needs aio-pika (pip install aio-pika).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import uuid
from typing import Any

import aio_pika


async def publish(url: str, exchange_name: str, job: dict[str, Any], delay_ms: int | None) -> str:
    """Publish ``job`` and return its id once RabbitMQ has confirmed it."""
    job_id = str(job.setdefault("id", str(uuid.uuid4())))
    async with await aio_pika.connect_robust(url) as connection:
        # Confirms on: publish() returns only once the broker has the message.
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(exchange_name, ensure=False)
        message = aio_pika.Message(
            json.dumps(job).encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=job_id,  # publishing the same id twice sends one mail
            headers={"x-delay": delay_ms} if delay_ms else {},
        )
        await exchange.publish(message, routing_key="send", mandatory=True)
    return job_id


def main() -> None:
    """Build a job from the options and publish it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", default=os.environ.get("MAILBUS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--prefix", default=os.environ.get("MAILBUS_PREFIX", "mailbus"))
    parser.add_argument("--domain", default="example.com")
    parser.add_argument("--from", dest="sender", default="app@example.com")
    parser.add_argument("--to", required=True, action="append")
    parser.add_argument("--subject", default="Hello from aio-pika")
    parser.add_argument("--text", default="Sent by producer_examples/publish_aio_pika.py")
    parser.add_argument("--id", help="job id (idempotency key); default: a new UUID")
    parser.add_argument("--delay-ms", type=int, help="send this many milliseconds later")
    args = parser.parse_args()
    job: dict[str, Any] = {
        "domain": args.domain,
        "from": args.sender,
        "to": args.to,
        "subject": args.subject,
        "text": args.text,
    }
    if args.id:
        job["id"] = args.id
    print(asyncio.run(publish(args.url, args.prefix, job, args.delay_ms)))


if __name__ == "__main__":
    main()
