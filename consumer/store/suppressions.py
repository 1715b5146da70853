"""The suppression list: addresses mail is never sent to, by scope.

Entries are added by operators (``mailbus suppress add``, kept until removed unless given
an expiry), or automatically for one domain: when a server calls a recipient unknown or a
bounce comes back later (kept for ``MAILBUS_BOUNCE_SUPPRESSION_DAYS``), when a recipient
complains, or when one unsubscribes from a list. ``_id`` is the scope's key of the
address (:meth:`Scope.key`: a global entry's is the lower-cased address alone, as before
scopes); expired entries are ignored at once and removed by a TTL index.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from consumer.clock import utcnow
from consumer.core.suppression import GLOBAL, Scope, scopes_for
from consumer.core.vocabulary import SuppressionSource
from consumer.store.batches import Batcher
from consumer.store.documents import Document, answering


def _live(now: datetime) -> Document:
    return {"$or": [{"expire_at": None}, {"expire_at": {"$gt": now}}]}


def scope_of(doc: Document) -> Scope:
    """The scope a stored entry applies to (entries from before scopes are global)."""
    return Scope(doc.get("domain"), doc.get("list"))


class SuppressionStore:
    """The ``suppressions`` collection."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self.entries = database["suppressions"]
        # Every job asks before it sends: concurrent questions share one query.
        self._lookups = Batcher(self._find_suppressed)

    async def ensure_indexes(self) -> None:
        """The TTL index that drops expired entries, and the listing's by scope."""
        async with answering():
            await self.entries.create_index("expire_at", expireAfterSeconds=0)
            await self.entries.create_index([("domain", 1), ("created_at", -1)])

    async def among(
        self, addresses: Iterable[str], *, domain: str, list_name: str | None = None
    ) -> set[str]:
        """The lower-cased addresses of ``addresses`` suppressed now for a job of ``domain``
        (sent for ``list_name``): globally, for the domain, or for that list.
        """
        keys = {
            scope.key(address): address.lower()
            for address in addresses
            for scope in scopes_for(domain, list_name)
        }
        found = await self._lookups.submit(frozenset(keys))
        return {keys[key] for key in found}

    async def _find_suppressed(self, asked: Sequence[frozenset[str]]) -> list[set[str]]:
        """For each set of keys, those suppressed now: one query for all."""
        wanted = sorted(frozenset().union(*asked))
        query = {"_id": {"$in": wanted}, **_live(utcnow())}
        async with answering():
            found = {doc["_id"] async for doc in self.entries.find(query, {"_id": 1})}
        return [set(keys & found) for keys in asked]

    async def add(
        self,
        address: str,
        reason: str,
        *,
        scope: Scope = GLOBAL,
        expire_at: datetime | None = None,
        source: SuppressionSource = "manual",
    ) -> None:
        """Suppress ``address`` in ``scope`` (replacing the entry it had there) until
        ``expire_at`` or for good.
        """
        doc = _entry(address, scope, source, reason, utcnow(), expire_at)
        async with answering():
            await self.entries.replace_one({"_id": scope.key(address)}, doc, upsert=True)

    async def add_automatic(
        self,
        reasons: Mapping[str, str],
        *,
        scope: Scope,
        source: SuppressionSource,
        days: float | None = None,
    ) -> None:
        """Suppress each address of ``reasons`` (address to why) in ``scope``, for ``days``
        or for good: what bounces, complaints and unsubscribes add.

        An operator's entry in the same scope is left as it is, and so is an automatic one
        kept for good (a complaint's) when this one would expire (a bounce's); an automatic
        one is otherwise renewed.
        """
        now = utcnow()
        expire_at = now + timedelta(days=days) if days is not None else None
        replaceable: Document = {"source": {"$ne": "manual"}}
        if expire_at is not None:
            replaceable["expire_at"] = {"$ne": None}
        async with answering():
            for address, reason in reasons.items():
                doc = _entry(address, scope, source, reason, now, expire_at)
                with contextlib.suppress(DuplicateKeyError):  # an entry that stands
                    await self.entries.replace_one(
                        {"_id": scope.key(address), **replaceable}, doc, upsert=True
                    )

    async def announced(self, address: str, *, scope: Scope) -> bool:
        """Whether ``address`` is suppressed in ``scope`` now and its unsubscribe was
        announced (:meth:`mark_announced`): asked again, there is nothing more to say.
        """
        query = {"_id": scope.key(address), "announced": True, **_live(utcnow())}
        async with answering():
            return await self.entries.find_one(query, {"_id": 1}) is not None

    async def mark_announced(self, address: str, *, scope: Scope) -> None:
        """Note that ``address``'s entry in ``scope`` has had its event published."""
        async with answering():
            await self.entries.update_one(
                {"_id": scope.key(address)}, {"$set": {"announced": True}}
            )

    async def remove(self, address: str, *, scope: Scope = GLOBAL) -> bool:
        """Lift the suppression of ``address`` in ``scope``; False if it had none there."""
        async with answering():
            result = await self.entries.delete_one({"_id": scope.key(address)})
        return result.deleted_count == 1

    async def find(
        self, limit: int = 100, *, domain: str | None = None, address: str | None = None
    ) -> list[Document]:
        """Suppressions in force, newest first: all, or one domain's (its lists' too), or
        one address's in every scope.
        """
        query = _live(utcnow())
        if domain is not None:
            query["domain"] = domain.lower()
        if address is not None:  # entries from before scopes have only their ``_id``
            who = address.lower()
            query = {"$and": [query, {"$or": [{"address": who}, {"_id": who}]}]}
        async with answering():
            cursor = self.entries.find(query).sort("created_at", -1).limit(limit)
            return [doc async for doc in cursor]


def _entry(
    address: str,
    scope: Scope,
    source: SuppressionSource,
    reason: str,
    now: datetime,
    expire_at: datetime | None,
) -> Document:
    return {
        "address": address.lower(),
        "domain": scope.domain,
        "list": scope.list_name,
        "source": source,
        "reason": reason,
        "created_at": now,
        "expire_at": expire_at,
    }
