"""Providers in MongoDB: their limits and token buckets, shared by every worker.

A provider document holds its limits, its burst and, per limit, the bucket's theoretical
arrival time and its queue's next wake-up slot (see :mod:`consumer.core.ratelimit`). Taking a
token is one atomic update whose arithmetic runs on the server against the server's clock
(``$$NOW``), so workers on machines whose clocks disagree still share one exact bucket.
The document also holds the provider's reply rules (see :mod:`consumer.core.replies`), in
their written form, and ``slowed_until`` (server microseconds): while it is ahead, takes
count every interval :data:`~consumer.core.ratelimit.SLOWDOWN` times as long.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase

from consumer.clock import utcnow
from consumer.core.ratelimit import MICROS, SLOWDOWN, Bucket, Grant, Limit, Mode, tokens_left
from consumer.core.replies import ReplyRule, rules_of
from consumer.store.documents import Document, answering

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NOW_US = {
    "$multiply": [
        {"$dateDiff": {"startDate": _EPOCH, "endDate": "$$NOW", "unit": "millisecond"}},
        MICROS // 1000,
    ]
}


# A limit's interval as a take counts it: longer while the provider is slowed (the take
# sets ``last_take.slowdown`` first).
_INTERVAL = {"$multiply": ["$$limit.interval", "$last_take.slowdown"]}


def _earliest(limits: object, field: str) -> Document:
    """The expression for ratelimit.take's ``earliest``: when ``field`` (``tat`` or
    ``queue``) of every limit in ``limits`` allows a send, and not before now.
    """
    starts = {
        "$map": {
            "input": limits,
            "as": "limit",
            "in": {
                "$subtract": [
                    f"$$limit.{field}",
                    # The burst's slack in time, slowed or not (ratelimit.take).
                    {"$multiply": [{"$subtract": ["$burst", 1]}, "$$limit.interval"]},
                ]
            },
        }
    }
    return {"$max": ["$last_take.now", {"$max": starts}]}


def _take_update(mode: Mode, count: int, horizon_us: int) -> list[Document]:
    """:func:`consumer.core.ratelimit.take`, as an update pipeline the server runs atomically.

    The outcome is left in ``last_take`` for the caller: ``now``, the ``granted`` tokens'
    slots, the ``queued`` wake-up slots handed out, and ``next``, when a refused job may
    come back.
    """
    granting = {
        "$let": {
            "vars": {"start": _earliest("$$value.limits", "tat")},
            "in": {
                "$cond": [
                    {"$lte": ["$$start", {"$add": ["$last_take.now", horizon_us]}]},
                    {
                        "limits": {
                            "$map": {
                                "input": "$$value.limits",
                                "as": "limit",
                                "in": {
                                    "$let": {
                                        "vars": {
                                            "tat": {
                                                "$add": [
                                                    {"$max": ["$$limit.tat", "$$start"]},
                                                    _INTERVAL,
                                                ]
                                            }
                                        },
                                        "in": {
                                            "$mergeObjects": [
                                                "$$limit",
                                                {
                                                    "tat": "$$tat",
                                                    "queue": {"$max": ["$$limit.queue", "$$tat"]},
                                                },
                                            ]
                                        },
                                    }
                                },
                            }
                        },
                        "slots": {"$concatArrays": ["$$value.slots", ["$$start"]]},
                    },
                    "$$value",
                ]
            },
        }
    }
    queueing = {
        "$let": {
            "vars": {"slot": _earliest("$$value.limits", "queue")},
            "in": {
                "limits": {
                    "$map": {
                        "input": "$$value.limits",
                        "as": "limit",
                        "in": {
                            "$mergeObjects": [
                                "$$limit",
                                {
                                    "queue": {
                                        "$add": [
                                            {"$max": ["$$limit.queue", "$$slot"]},
                                            _INTERVAL,
                                        ]
                                    }
                                },
                            ]
                        },
                    }
                },
                "slots": {"$concatArrays": ["$$value.slots", ["$$slot"]]},
            },
        }
    }
    may_take = (
        True if mode == "queued" else {"$lte": [_earliest("$limits", "queue"), "$last_take.now"]}
    )
    stages: list[Document] = [
        {"$set": {"last_take": {"now": _NOW_US}}},
        {
            "$set": {
                "last_take.slowdown": {
                    "$cond": [
                        {"$gt": [{"$ifNull": ["$slowed_until", 0]}, "$last_take.now"]},
                        SLOWDOWN,
                        1,
                    ]
                }
            }
        },
        {"$set": {"last_take.open": may_take}},
        {
            "$set": {
                "last_take.taken": {
                    "$cond": [
                        "$last_take.open",
                        {
                            "$reduce": {
                                "input": {"$range": [0, count]},
                                "initialValue": {"limits": "$limits", "slots": []},
                                "in": granting,
                            }
                        },
                        {"limits": "$limits", "slots": []},
                    ]
                }
            }
        },
        {
            "$set": {
                "limits": "$last_take.taken.limits",
                "last_take.granted": "$last_take.taken.slots",
            }
        },
    ]
    if mode == "enqueue":
        stages.append(
            {
                "$set": {
                    "last_take.waits": {
                        "$reduce": {
                            "input": {"$range": [{"$size": "$last_take.granted"}, count]},
                            "initialValue": {"limits": "$limits", "slots": []},
                            "in": queueing,
                        }
                    }
                }
            }
        )
        stages.append(
            {
                "$set": {
                    "limits": "$last_take.waits.limits",
                    "last_take.queued": "$last_take.waits.slots",
                }
            }
        )
    else:
        stages.append(
            {
                "$set": {
                    "last_take.queued": [],
                    "last_take.next": _earliest("$limits", "tat" if mode == "queued" else "queue"),
                }
            }
        )
    stages.append({"$unset": ["last_take.open", "last_take.taken", "last_take.waits"]})
    return stages


def provider_document(
    name: str, limits: Sequence[Limit], burst: int, replies: Sequence[ReplyRule] = ()
) -> Document:
    """A provider's stored form, its buckets full (and not slowed)."""
    return {
        "_id": name,
        "burst": burst,
        "replies": [str(rule) for rule in replies],
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
    slowdown = slowdown_of(doc, now)
    left = {}
    for limit, state in zip(limits_of(doc), doc.get("limits", []), strict=True):
        bucket = Bucket(int(state.get("tat", 0)), int(state.get("queue", 0)))
        left[str(limit)] = tokens_left(limit, burst, bucket, now_us, slowdown)
    return {
        "tokens": min(left.values(), default=burst),
        "burst": burst,
        "slowdown": slowdown,
        "limits": [{"limit": name, "tokens": tokens} for name, tokens in left.items()],
    }


def slowdown_of(doc: Document, now: datetime) -> int:
    """How many times longer the provider's intervals are at ``now``: 1, or
    :data:`~consumer.core.ratelimit.SLOWDOWN` while it is slowed.
    """
    slowed = int(doc.get("slowed_until", 0)) > now.timestamp() * MICROS
    return SLOWDOWN if slowed else 1


class ProviderStore:
    """The ``providers`` collection."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self.providers = database["providers"]

    async def put(
        self, name: str, limits: Sequence[Limit], burst: int, replies: Sequence[ReplyRule] = ()
    ) -> bool:
        """Create or replace a provider (its buckets start full); True when it is new."""
        async with answering():
            result = await self.providers.replace_one(
                {"_id": name}, provider_document(name, limits, burst, replies), upsert=True
            )
        return result.upserted_id is not None

    async def set_reply_rules(self, name: str, replies: Sequence[ReplyRule]) -> bool:
        """Replace the provider's reply rules, its buckets untouched; False if there is no
        such provider.
        """
        written = [str(rule) for rule in replies]
        async with answering():
            result = await self.providers.update_one(
                {"_id": name}, {"$set": {"replies": written, "updated_at": utcnow()}}
            )
        return result.matched_count == 1

    async def reply_rules(self, name: str) -> tuple[ReplyRule, ...]:
        """The provider's rules for SMTP replies (none for a provider not defined)."""
        async with answering():
            doc = await self.providers.find_one({"_id": name}, {"replies": 1})
        return rules_of(doc.get("replies")) if doc is not None else ()

    async def slow(self, name: str, seconds: float) -> datetime | None:
        """Slow the provider for ``seconds`` from now, on the server's clock (a slowdown
        already running ends then instead); when it ends, or None for a provider not
        defined.
        """
        until = {"$add": [_NOW_US, round(seconds * MICROS)]}
        async with answering():
            doc = await self.providers.find_one_and_update(
                {"_id": name},
                [{"$set": {"slowed_until": until}}],
                projection={"slowed_until": 1},
                return_document=ReturnDocument.AFTER,
            )
        if doc is None:
            return None
        return datetime.fromtimestamp(int(doc["slowed_until"]) / MICROS, UTC)

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

    async def take(
        self, name: str, mode: Mode, count: int = 1, horizon_us: int = 0
    ) -> list[Grant] | None:
        """:func:`consumer.core.ratelimit.take` on ``name``'s buckets, at the server's clock, in
        one atomic command: one grant per job, in order.

        None when no such provider is defined: its outboxes send without a limit.
        """
        async with answering():
            doc = await self.providers.find_one_and_update(
                {"_id": name},
                _take_update(mode, count, horizon_us),
                return_document=ReturnDocument.AFTER,
            )
        if doc is None:
            return None
        return _grants(doc["last_take"], count)


def _grants(taken: dict[str, Any], count: int) -> list[Grant]:
    """The grants a take left in ``last_take``: the tokens, then the wake-up slots, then
    refusals until the next token.
    """
    now = int(taken["now"])
    grants = [Grant(True, int(slot), now) for slot in taken["granted"]]
    grants += [Grant(False, int(slot), now, queued=True) for slot in taken["queued"]]
    grants += [Grant(False, int(taken.get("next", now)), now)] * (count - len(grants))
    return grants
