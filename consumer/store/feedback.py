"""The ``feedback`` collection: bounces and complaints counted by the hour, for
``mailbus status``, the metrics and the admin digest. One small document an hour, found by
its ``_id``; a TTL index drops them after :data:`KEPT`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pymongo.asynchronous.database import AsyncDatabase

from consumer.core.vocabulary import FEEDBACK_TALLIES, FeedbackTally
from consumer.store.documents import Document, answering

KEPT = timedelta(days=8)


def _hour(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def _key(hour: datetime) -> str:
    return hour.strftime("%Y-%m-%dT%H")


class FeedbackCounts:
    """Bounces (hard, soft) and complaints recorded, by the hour."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self.counts = database["feedback"]

    async def ensure_indexes(self) -> None:
        """The TTL index; idempotent."""
        async with answering():
            await self.counts.create_index("expire_at", expireAfterSeconds=0)

    async def add(self, what: FeedbackTally, at: datetime) -> None:
        """Count one ``what`` at ``at``."""
        hour = _hour(at)
        async with answering():
            await self.counts.update_one(
                {"_id": _key(hour)},
                {"$inc": {what: 1}, "$setOnInsert": {"hour": hour, "expire_at": hour + KEPT}},
                upsert=True,
            )

    async def since(self, since: datetime, now: datetime) -> dict[FeedbackTally, int]:
        """What was counted from the hour of ``since`` to ``now``."""
        hours: list[str] = []
        hour = _hour(since)
        while hour <= now and len(hours) < KEPT.days * 24:
            hours.append(_key(hour))
            hour += timedelta(hours=1)
        totals = dict.fromkeys(FEEDBACK_TALLIES, 0)
        async with answering():
            async for doc in self.counts.find({"_id": {"$in": hours}}):
                for what in FEEDBACK_TALLIES:
                    totals[what] += int(doc.get(what, 0))
        return totals
