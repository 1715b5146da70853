"""Lateness of scheduled mail: jobs published with ``x-delay`` across a span of seconds,
measured to the moment the SMTP server had each one, from two starting points:

- ``from_publish``: publish time plus delay, what a producer experiences; it includes the
  worker's intake (how soon it first sees the job) on a machine shared with the broker,
  the database and this harness;
- ``from_due``: the due time the worker recorded when it first saw the job (``due_at``
  in MongoDB), the scheduler's own precision: ladder, hold and send.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any

import aio_pika

from consumer.amqp.publish import job_message, jobs_exchange
from consumer.core.names import SEND_KEY, Names
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from deploy.bench.percentiles import summary
from deploy.devstack.smtp_capture import CaptureServer


async def _recorded_due(settings: Settings, job_ids: list[str]) -> dict[str, float]:
    async with JobStore.connect(settings) as store:
        cursor = store.jobs.find({"_id": {"$in": job_ids}}, {"due_at": 1})
        return {doc["_id"]: doc["due_at"].timestamp() async for doc in cursor}


async def measure(
    settings: Settings,
    smtp: CaptureServer,
    jobs: int,
    shortest: float,
    longest: float,
    publish_rate: float,
) -> dict[str, Any]:
    """Publish ``jobs`` delayed jobs at ``publish_rate`` per second and time their arrival.

    A worker for ``settings`` must be running. Lateness is arrival minus (publish + delay),
    so it includes the worker's intake as well as the ladder and the final hold.
    """
    rng = random.Random(7)  # noqa: S311  (spread of test delays, not security)
    due: dict[str, float] = {}
    names = Names(settings.prefix)
    async with await aio_pika.connect(settings.amqp_url.get_secret_value()) as connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await jobs_exchange(channel, names)
        started = time.time()
        for index in range(jobs):
            delay = rng.uniform(shortest, longest)
            job_id = f"late-{uuid.uuid4().hex}"
            body = {
                "id": job_id,
                "domain": "example.com",
                "from": "bench@example.com",
                "to": ["sink@example.org"],
                "subject": job_id,
                "text": "lateness",
            }
            message = job_message(body, delay_ms=round(delay * 1000))
            due[job_id] = time.time() + round(delay * 1000) / 1000
            await exchange.publish(message, routing_key=SEND_KEY, mandatory=True)
            pause = started + (index + 1) / publish_rate - time.time()
            if pause > 0:
                await asyncio.sleep(pause)
        published_in = time.time() - started
    async with asyncio.timeout(longest + 120):
        received = await smtp.wait_for(jobs)
    arrived = {str(m.message()["Subject"]): m.received_at for m in received}
    recorded = await _recorded_due(settings, list(due))
    from_publish = [(arrived[job_id] - due[job_id]) * 1000 for job_id in due if job_id in arrived]
    from_due = [(arrived[job_id] - at) * 1000 for job_id, at in recorded.items()]
    return {
        "jobs": jobs,
        "delivered": len(from_publish),
        "delay_span_s": [shortest, longest],
        "publish_rate_per_s": publish_rate,
        "publish_seconds": round(published_in, 2),
        "early": sum(1 for value in from_due + from_publish if value < 0),
        "from_publish_ms": summary(from_publish),
        "from_due_ms": summary(from_due),
    }
