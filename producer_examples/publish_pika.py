"""Publish one mail job with pika, for synchronous applications (Django, Flask, scripts).

    python publish_pika.py --to someone@example.org --subject Hi --text Hello [--delay-ms 60000]

Publisher confirms make basic_publish raise if the broker did not take the message.
Reads MAILBUS_AMQP_URL and MAILBUS_PREFIX; prints the job id. Needs pika (pip install pika).
"""

from __future__ import annotations

import argparse
import json
import os
import uuid
from typing import Any

import pika


def publish(url: str, exchange: str, job: dict[str, Any], delay_ms: int | None = None) -> str:
    """Publish ``job`` and return its id once RabbitMQ has confirmed it.

    In a web application keep one connection per process rather than one per mail.
    """
    job_id = str(job.setdefault("id", str(uuid.uuid4())))
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()  # basic_publish now raises unless the broker confirms
        channel.basic_publish(
            exchange=exchange,
            routing_key="send",
            body=json.dumps(job).encode(),
            properties=pika.BasicProperties(
                content_type="application/json",
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=job_id,
                headers={"x-delay": delay_ms} if delay_ms else None,
            ),
            mandatory=True,
        )
    finally:
        connection.close()
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
    parser.add_argument("--subject", default="Hello from pika")
    parser.add_argument("--text", default="Sent by producer_examples/publish_pika.py")
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
    print(publish(args.url, args.prefix, job, args.delay_ms))


if __name__ == "__main__":
    main()
