"""The suppression list: addresses mail is never sent to.

Entries are added by operators (``mailbus suppress add``, kept until removed unless given
an expiry) or automatically when a server calls a recipient unknown (kept for
``MAILBUS_BOUNCE_SUPPRESSION_DAYS``). ``_id`` is the lower-cased address; expired entries
are ignored at once and removed by a TTL index.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from consumer.clock import utcnow
from consumer.store.batches import Batcher
from consumer.store.documents import Document, answering

MANUAL = "manual"
BOUNCE = "bounce"


def _live(now: datetime) -> Document:
    return {"$or": [{"expire_at": None}, {"expire_at": {"$gt": now}}]}


class SuppressionStore:
    """The ``suppressions`` collection."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self.entries = database["suppressions"]
        # Every job asks before it sends: concurrent questions share one query.
        self._lookups = Batcher(self._find_suppressed)

    async def ensure_indexes(self) -> None:
        """The TTL index that drops expired entries."""
        async with answering():
            await self.entries.create_index("expire_at", expireAfterSeconds=0)

    async def among(self, addresses: Iterable[str]) -> set[str]:
        """The lower-cased addresses of ``addresses`` that are suppressed now."""
        return await self._lookups.submit(frozenset(a.lower() for a in addresses))

    async def _find_suppressed(self, asked: Sequence[frozenset[str]]) -> list[set[str]]:
        """For each set of lower-cased addresses, those suppressed now: one query for all."""
        wanted = sorted(frozenset().union(*asked))
        query = {"_id": {"$in": wanted}, **_live(utcnow())}
        async with answering():
            found = {doc["_id"] async for doc in self.entries.find(query, {"_id": 1})}
        return [set(addresses & found) for addresses in asked]

    async def add(
        self, address: str, reason: str, expire_at: datetime | None = None, source: str = MANUAL
    ) -> None:
        """Suppress ``address`` (replacing any entry it had) until ``expire_at`` or for good."""
        doc = {"source": source, "reason": reason, "created_at": utcnow(), "expire_at": expire_at}
        async with answering():
            await self.entries.replace_one({"_id": address.lower()}, doc, upsert=True)

    async def add_bounced(self, refusals: dict[str, str], days: float) -> None:
        """Suppress recipients a server called unknown (address to its reply) for ``days``.

        An operator's entry is left as it is; an earlier bounce is renewed.
        """
        now = utcnow()
        expire_at = now + timedelta(days=days)
        async with answering():
            for address, reply in refusals.items():
                doc = {"source": BOUNCE, "reason": reply, "created_at": now, "expire_at": expire_at}
                with contextlib.suppress(DuplicateKeyError):  # a manual entry: it stands
                    await self.entries.replace_one(
                        {"_id": address.lower(), "source": BOUNCE}, doc, upsert=True
                    )

    async def remove(self, address: str) -> bool:
        """Lift the suppression of ``address``; False if it was not suppressed."""
        async with answering():
            result = await self.entries.delete_one({"_id": address.lower()})
        return result.deleted_count == 1

    async def find(self, limit: int = 100) -> list[Document]:
        """Suppressed addresses in force, newest first."""
        async with answering():
            cursor = self.entries.find(_live(utcnow())).sort("created_at", -1).limit(limit)
            return [doc async for doc in cursor]
