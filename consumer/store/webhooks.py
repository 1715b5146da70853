"""Webhook endpoints and their delivery attempts in MongoDB.

``webhooks``: one endpoint per document (``_id`` ``wh_…``): its domain, URL, the event
types it takes, its secret encrypted with ``MAILBUS_SECRET_KEY``, whether it is active.
``webhook_attempts``: one document per delivery attempt, its texts bounded, removed by a
TTL index ``MAILBUS_WEBHOOK_LOG_DAYS`` after it was made.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

from pymongo import DESCENDING
from pymongo.asynchronous.database import AsyncDatabase

from consumer.clock import utcnow
from consumer.store.documents import Document, answering

# What an attempt's document keeps of an error or a response body.
MAX_LOGGED_TEXT = 500


class WebhookStore:
    """The ``webhooks`` and ``webhook_attempts`` collections."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self.endpoints = database["webhooks"]
        self.attempts = database["webhook_attempts"]

    async def ensure_indexes(self) -> None:
        """The endpoints' lookup by domain, the log's orders, and its TTL; idempotent."""
        async with answering():
            await self.endpoints.create_index("domain")
            await self.attempts.create_index([("at", DESCENDING)])
            await self.attempts.create_index([("domain", 1), ("at", DESCENDING)])
            await self.attempts.create_index("expire_at", expireAfterSeconds=0)

    async def add(self, domain: str, url: str, events: list[str], secret_token: str) -> str:
        """Store an endpoint (``secret_token``: its secret, encrypted); returns its id."""
        endpoint_id = "wh_" + secrets.token_hex(8)
        doc = {
            "_id": endpoint_id,
            "domain": domain.lower(),
            "url": url,
            "events": events,
            "secret": secret_token,
            "active": True,
            "created_at": utcnow(),
        }
        async with answering():
            await self.endpoints.insert_one(doc)
        return endpoint_id

    async def listed(self, domain: str | None = None) -> list[Document]:
        """Every endpoint (of ``domain``), by domain then age."""
        query = {"domain": domain.lower()} if domain else {}
        async with answering():
            cursor = self.endpoints.find(query).sort([("domain", 1), ("created_at", 1)])
            return [doc async for doc in cursor]

    async def active(self) -> list[Document]:
        """Every active endpoint (an operator's list: a few, never one per job)."""
        async with answering():
            return [doc async for doc in self.endpoints.find({"active": True})]

    async def get(self, endpoint_id: str) -> Document | None:
        """One endpoint, active or not."""
        async with answering():
            return await self.endpoints.find_one({"_id": endpoint_id})

    async def remove(self, endpoint_id: str) -> bool:
        """Remove an endpoint; False when there is none of that id."""
        async with answering():
            result = await self.endpoints.delete_one({"_id": endpoint_id})
        return result.deleted_count == 1

    async def deactivate(self, endpoint_id: str, why: str) -> None:
        """Turn an endpoint off (it answered 410 Gone), saying why."""
        async with answering():
            await self.endpoints.update_one(
                {"_id": endpoint_id},
                {"$set": {"active": False, "inactive_since": utcnow(), "inactive_why": why}},
            )

    async def log(self, attempt: dict[str, Any], days: float) -> None:
        """Note one delivery attempt, kept ``days``; its free texts are cut short."""
        now = utcnow()
        doc = {
            **attempt,
            "at": now,
            "expire_at": now + timedelta(days=days),
        }
        for field in ("error", "response"):
            if isinstance(doc.get(field), str):
                doc[field] = doc[field][:MAX_LOGGED_TEXT]
        async with answering():
            await self.attempts.insert_one(doc)

    async def recent(self, domain: str | None, limit: int) -> list[Document]:
        """The latest ``limit`` attempts (of ``domain``), newest first."""
        query = {"domain": domain.lower()} if domain else {}
        async with answering():
            cursor = self.attempts.find(query).sort("at", DESCENDING).limit(limit)
            return [doc async for doc in cursor]
