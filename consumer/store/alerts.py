"""The ``alerts`` collection: dead letters waiting for an admin digest, and those reported."""

from __future__ import annotations

from datetime import datetime

from pymongo.asynchronous.database import AsyncDatabase

from consumer.store.documents import Document, answering


class AlertStore:
    """The ``alerts`` collection: dead letters not yet reported, and those that were."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self.alerts = database["alerts"]

    async def ensure_indexes(self) -> None:
        """The indexes the digest's queries use, and the TTL; idempotent."""
        async with answering():
            await self.alerts.create_index([("digest", 1), ("at", 1)])
            await self.alerts.create_index("expire_at", expireAfterSeconds=0)

    async def note(self, alert: Document) -> None:
        """Note one dead letter."""
        async with answering():
            await self.alerts.insert_one(alert)

    async def oldest_waiting(self) -> Document | None:
        """The oldest dead letter no digest has reported."""
        async with answering():
            return await self.alerts.find_one({"digest": None}, sort=[("at", 1), ("_id", 1)])

    async def waiting_until(self, cutoff: datetime, limit: int) -> tuple[list[Document], int]:
        """The first ``limit`` unreported dead letters up to ``cutoff``, and how many in all."""
        query = {"digest": None, "at": {"$lte": cutoff}}
        async with answering():
            cursor = self.alerts.find(query).sort([("at", 1), ("_id", 1)]).limit(limit)
            listed = [doc async for doc in cursor]
            return listed, await self.alerts.count_documents(query)

    async def reported(self, cutoff: datetime, digest_id: str) -> None:
        """Mark the dead letters up to ``cutoff`` as reported by ``digest_id``."""
        async with answering():
            await self.alerts.update_many(
                {"digest": None, "at": {"$lte": cutoff}}, {"$set": {"digest": digest_id}}
            )
