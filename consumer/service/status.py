"""What ``mailbus status`` reports, read from RabbitMQ and MongoDB into one JSON-ready
dictionary (shaped by :mod:`consumer.core.status`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from consumer.amqp.queue_stats import queue_figures
from consumer.core.names import Names
from consumer.core.status import (
    LAST_ERRORS,
    error_of,
    ladder_of,
    queues_of,
    start_of_day,
    today_of,
)
from consumer.settings import Settings
from consumer.store.mongo import Mongo
from consumer.store.providers import tokens_of


async def gather(settings: Settings, now: datetime) -> dict[str, Any]:
    """Everything ``mailbus status`` shows, read from RabbitMQ and MongoDB."""
    names = Names(settings.prefix)
    webhooks = (names.webhooks_queue, names.webhooks_dead)
    source, figures = await queue_figures(settings, (*names.queues(), *webhooks))
    since = start_of_day(now)
    async with Mongo.connect(settings) as mongo:
        counts = await mongo.jobs.finished_since(since)
        errors = await mongo.jobs.last_errors(LAST_ERRORS)
        outboxes = await mongo.outboxes.find()
        providers = await mongo.providers.find()
        feedback = await mongo.feedback.since(since, now)
    provider_of = {o["_id"]: o["provider"] for o in outboxes if o.get("provider")}
    return {
        "at": now.isoformat(),
        "queue_source": source,
        "queues": queues_of(names, figures),
        "ladder": ladder_of(names, figures),
        "today": today_of(counts, provider_of, since, feedback),
        "providers": {p["_id"]: tokens_of(p, now) for p in providers},
        "last_errors": [error_of(doc) for doc in errors],
    }
