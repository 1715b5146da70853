"""Providers in MongoDB: their limits and token buckets, shared by every worker.

A provider document holds its limits, its burst and, per limit, the bucket's theoretical
arrival time (see :mod:`consumer.ratelimit`). Taking a token is one atomic update whose
arithmetic runs on the server against the server's clock (``$$NOW``), so workers on
machines whose clocks disagree still share one exact bucket.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase

from consumer.ratelimit import MICROS, Grant, Limit
from consumer.store import Document, answering, utcnow

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A reservation takes the earliest slot however far away it is.
FOREVER_US = 2**62
_NOW_US = {
    "$multiply": [
        {"$dateDiff": {"startDate": _EPOCH, "endDate": "$$NOW", "unit": "millisecond"}},
        MICROS // 1000,
    ]
}


def _take_update(max_wait_us: int) -> list[Document]:
    """:func:`consumer.ratelimit.take`, as an update pipeline the server runs atomically.

    The outcome is left in ``last_take`` (``now``, ``slot``, ``granted``, ``spacing``) for
    the caller.
    """
    spare = {"$multiply": [{"$subtract": ["$burst", 1]}, "$$this.interval"]}
    earliest = {"$subtract": ["$$this.tat", spare]}
    intervals = {"$map": {"input": "$limits", "in": "$$this.interval"}}
    moved = {"$add": [{"$max": ["$$this.tat", "$last_take.slot"]}, "$$this.interval"]}
    return [
        {"$set": {"last_take": {"now": _NOW_US, "spacing": {"$min": intervals}}}},
        {
            "$set": {
                "last_take.slot": {
                    "$max": [
                        "$last_take.now",
                        {"$max": {"$map": {"input": "$limits", "in": earliest}}},
                    ]
                }
            }
        },
        {
            "$set": {
                "last_take.granted": {
                    "$lte": [
                        {"$subtract": ["$last_take.slot", "$last_take.now"]},
                        max_wait_us,
                    ]
                }
            }
        },
        {
            "$set": {
                "limits": {
                    "$cond": [
                        "$last_take.granted",
                        {
                            "$map": {
                                "input": "$limits",
                                "in": {"$mergeObjects": ["$$this", {"tat": moved}]},
                            }
                        },
                        "$limits",
                    ]
                }
            }
        },
    ]


_TAKE_NOW = _take_update(0)
_RESERVE = _take_update(FOREVER_US)


def provider_document(name: str, limits: Sequence[Limit], burst: int) -> Document:
    """A provider's stored form, its buckets full."""
    return {
        "_id": name,
        "burst": burst,
        "limits": [
            {"count": lim.count, "period": lim.period, "interval": lim.interval_us, "tat": 0}
            for lim in limits
        ],
        "updated_at": utcnow(),
    }


def limits_of(doc: Document) -> list[Limit]:
    """The limits a stored provider document holds."""
    return [Limit(int(lim["count"]), int(lim["period"])) for lim in doc.get("limits", [])]


class ProviderStore:
    """The ``providers`` collection."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self.providers = database["providers"]

    async def put(self, name: str, limits: Sequence[Limit], burst: int) -> bool:
        """Create or replace a provider (its buckets start full); True when it is new."""
        async with answering():
            result = await self.providers.replace_one(
                {"_id": name}, provider_document(name, limits, burst), upsert=True
            )
        return result.upserted_id is not None

    async def find(self) -> list[Document]:
        """Every provider, by name."""
        async with answering():
            return [doc async for doc in self.providers.find({}).sort("_id", 1)]

    async def get(self, name: str) -> Document | None:
        """One provider, or None."""
        async with answering():
            return await self.providers.find_one({"_id": name})

    async def remove(self, name: str) -> bool:
        """Delete; False if there is no such provider."""
        async with answering():
            result = await self.providers.delete_one({"_id": name})
        return result.deleted_count == 1

    async def take(self, name: str, reserve: bool = False) -> Grant | None:
        """Take a token of ``name`` now, or with ``reserve`` the earliest one however far.

        None when no such provider is defined: its outboxes send without a limit.
        """
        async with answering():
            doc = await self.providers.find_one_and_update(
                {"_id": name},
                _RESERVE if reserve else _TAKE_NOW,
                return_document=ReturnDocument.AFTER,
            )
        if doc is None:
            return None
        return _grant(doc["last_take"])

    async def now_us(self) -> int:
        """The server's clock, in microseconds since the epoch."""
        async with answering():
            cursor = await self.providers.database.aggregate(
                [{"$documents": [{}]}, {"$project": {"now": _NOW_US}}]
            )
            async for row in cursor:
                return int(row["now"])
        raise RuntimeError("the server returned no time")


def _grant(taken: dict[str, Any]) -> Grant:
    return Grant(
        bool(taken["granted"]), int(taken["slot"]), int(taken["now"]), int(taken["spacing"])
    )
