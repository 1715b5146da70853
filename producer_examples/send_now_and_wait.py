"""Force a mail out now and wait for the SMTP outcome (RPC over RabbitMQ).

    python send_now_and_wait.py --to someone@example.org --subject Hi --text Hello [--timeout 30]

Publishes to ``send.now`` (the queue workers serve first) with ``reply_to`` set to
RabbitMQ's direct reply-to; the worker answers with the outcome, printed as JSON:
``{"id", "status": "sent"|"dead"|"deferred"|"skipped", "smtp": {...}, ...}``.
Exit status 0 if sent, 1 if not, 3 if no answer came in time. Needs aio-pika.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

REPLY_TO = "amq.rabbitmq.reply-to"


async def send_now(
    url: str, exchange_name: str, job: dict[str, Any], wait_seconds: float
) -> dict[str, Any] | None:
    """Publish ``job`` to ``send.now`` and return the worker's answer (None on timeout)."""
    async with await aio_pika.connect_robust(url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        correlation_id = str(uuid.uuid4())

        async def on_reply(reply: AbstractIncomingMessage) -> None:
            if reply.correlation_id == correlation_id and not answer.done():
                answer.set_result(json.loads(reply.body))

        # Direct reply-to: consume the pseudo-queue (no ack) before publishing.
        replies = await channel.get_queue(REPLY_TO, ensure=False)
        await replies.consume(on_reply, no_ack=True)
        exchange = await channel.get_exchange(exchange_name, ensure=False)
        message = aio_pika.Message(
            json.dumps(job).encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=job.setdefault("id", str(uuid.uuid4())),
            reply_to=REPLY_TO,
            correlation_id=correlation_id,
        )
        await exchange.publish(message, routing_key="send.now", mandatory=True)
        try:
            return await asyncio.wait_for(answer, wait_seconds)
        except TimeoutError:
            return None


def main() -> int:
    """Send, wait, print the outcome; the exit status says how it went."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", default=os.environ.get("MAILBUS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--prefix", default=os.environ.get("MAILBUS_PREFIX", "mailbus"))
    parser.add_argument("--domain", default="example.com")
    parser.add_argument("--from", dest="sender", default="app@example.com")
    parser.add_argument("--to", required=True, action="append")
    parser.add_argument("--subject", default="Sent now")
    parser.add_argument("--text", default="Sent by producer_examples/send_now_and_wait.py")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait")
    args = parser.parse_args()
    job = {
        "domain": args.domain,
        "from": args.sender,
        "to": args.to,
        "subject": args.subject,
        "text": args.text,
    }
    outcome = asyncio.run(send_now(args.url, args.prefix, job, args.timeout))
    if outcome is None:
        print("no answer in time (is a worker running?)", file=sys.stderr)
        return 3
    print(json.dumps(outcome))
    return 0 if outcome.get("status") == "sent" else 1


if __name__ == "__main__":
    sys.exit(main())
