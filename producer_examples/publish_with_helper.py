"""Publish one mail job from application code with mailbus's own helper,
``consumer.amqp.publish.publish_job`` (confirms, persistent, the id as message_id).

    python publish_with_helper.py --to someone@example.org [--delay-ms 60000]

Needs mailbus installed (pip install it from this repository) for ``consumer.amqp.publish``.
"""

from __future__ import annotations

import argparse
import asyncio
import os

import aio_pika

from consumer.amqp.publish import publish_job
from consumer.core.names import Names


async def main(url: str, prefix: str, to: list[str], delay_ms: int | None) -> None:
    """Publish a welcome mail and print its id."""
    async with await aio_pika.connect_robust(url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        job = {
            "domain": "example.com",
            "from": {"email": "app@example.com", "name": "Our app"},
            "to": to,
            "subject": "Welcome",
            "text": "Welcome aboard.",
            "html": "<p>Welcome <b>aboard</b>.</p>",
            "tags": ["welcome"],
        }
        print(await publish_job(channel, job, names=Names(prefix), delay_ms=delay_ms))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", default=os.environ.get("MAILBUS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--prefix", default=os.environ.get("MAILBUS_PREFIX", "mailbus"))
    parser.add_argument("--to", required=True, action="append")
    parser.add_argument("--delay-ms", type=int)
    args = parser.parse_args()
    asyncio.run(main(args.url, args.prefix, args.to, args.delay_ms))
