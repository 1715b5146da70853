"""Providers in MongoDB: their limits and token buckets, shared by every worker.

A provider document holds its limits, its burst and, per limit, the bucket's theoretical
arrival time and its queue's next wake-up slot (see :mod:`consumer.ratelimit`). Taking a
token is one atomic update whose arithmetic runs on the server against the server's clock
(``$$NOW``), so workers on machines whose clocks disagree still share one exact bucket.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase

from consumer.ratelimit import MICROS, Bucket, Grant, Limit, Mode, tokens_left
from consumer.store import Document, answering, utcnow

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NOW_US = {
    "$multiply": [
        {"$dateDiff": {"startDate": _EPOCH, "endDate": "$$NOW", "unit": "millisecond"}},
        MICROS // 1000,
    ]
}


def _take_update(mode: Mode) -> list[Document]:
    """:func:`consumer.ratelimit.take`, as an update pipeline the server runs atomically.

    The outcome is left in ``last_take`` (``now``, ``granted``, ``slot``, ``queued``) for
    the caller.
    """
    spare = {"$multiply": [{"$subtract": ["$burst", 1]}, "$$this.interval"]}

    def earliest(field: str) -> Document:
        starts = {"$map": {"input": "$limits", "in": {"$subtract": [f"$$this.{field}", spare]}}}
        return {"$max": ["$last_take.now", {"$max": starts}]}

    taken = {"$add": [{"$max": ["$$this.tat", "$last_take.now"]}, "$$this.interval"]}
    take_now = {
        "$map": {
            "input": "$limits",
            "in": {
                "$let": {
                    "vars": {"tat": taken},
                    "in": {
                        "$mergeObjects": [
                            "$$this",
                            {"tat": "$$tat", "queue": {"$max": ["$$this.queue", "$$tat"]}},
                        ]
                    },
                }
            },
        }
    }
    enqueue = {
        "$map": {
            "input": "$limits",
            "in": {
                "$mergeObjects": [
                    "$$this",
                    {
                        "queue": {
                            "$add": [
                                {"$max": ["$$this.queue", "$last_take.queue"]},
                                "$$this.interval",
                            ]
                        }
                    },
                ]
            },
        }
    }
    real_now = {"$lte": ["$last_take.real", "$last_take.now"]}
    allowed = (
        real_now
        if mode == "queued"
        else {"$and": [real_now, {"$lte": ["$last_take.queue", "$last_take.now"]}]}
    )
    return [
        {"$set": {"last_take": {"now": _NOW_US}}},
        {"$set": {"last_take.real": earliest("tat"), "last_take.queue": earliest("queue")}},
        {"$set": {"last_take.granted": allowed}},
        {
            "$set": {
                "limits": {
                    "$cond": [
                        "$last_take.granted",
                        take_now,
                        enqueue if mode == "enqueue" else "$limits",
                    ]
                },
                "last_take.slot": {
                    "$cond": [
                        "$last_take.granted",
                        "$last_take.now",
                        "$last_take.real" if mode == "queued" else "$last_take.queue",
                    ]
                },
                "last_take.queued": {"$and": [mode == "enqueue", {"$not": ["$last_take.granted"]}]},
            }
        },
    ]


_UPDATES: dict[Mode, list[Document]] = {
    mode: _take_update(mode) for mode in ("try", "enqueue", "queued")
}


def provider_document(name: str, limits: Sequence[Limit], burst: int) -> Document:
    """A provider's stored form, its buckets full."""
    return {
        "_id": name,
        "burst": burst,
        "limits": [
            {
                "count": lim.count,
                "period": lim.period,
                "interval": lim.interval_us,
                "tat": 0,
                "queue": 0,
            }
            for lim in limits
        ],
        "updated_at": utcnow(),
    }


def limits_of(doc: Document) -> list[Limit]:
    """The limits a stored provider document holds."""
    return [Limit(int(lim["count"]), int(lim["period"])) for lim in doc.get("limits", [])]


def tokens_of(doc: Document, now: datetime) -> dict[str, Any]:
    """A provider's tokens left now: per limit, and the fewest (what a send needs)."""
    burst = int(doc.get("burst", 1))
    now_us = int(now.timestamp() * MICROS)
    left = {}
    for limit, state in zip(limits_of(doc), doc.get("limits", []), strict=True):
        bucket = Bucket(int(state.get("tat", 0)), int(state.get("queue", 0)))
        left[str(limit)] = tokens_left(limit, burst, bucket, now_us)
    return {
        "tokens": min(left.values(), default=burst),
        "burst": burst,
        "limits": [{"limit": name, "tokens": tokens} for name, tokens in left.items()],
    }


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

    async def take(self, name: str, mode: Mode) -> Grant | None:
        """:func:`consumer.ratelimit.take` on ``name``'s buckets, at the server's clock.

        None when no such provider is defined: its outboxes send without a limit.
        """
        async with answering():
            doc = await self.providers.find_one_and_update(
                {"_id": name}, _UPDATES[mode], return_document=ReturnDocument.AFTER
            )
        if doc is None:
            return None
        return _grant(doc["last_take"])


def _grant(taken: dict[str, Any]) -> Grant:
    return Grant(
        bool(taken["granted"]), int(taken["slot"]), int(taken["now"]), bool(taken["queued"])
    )
