"""Outboxes in MongoDB.

Each outbox is a document in ``outboxes`` (``_id`` is its name) with its domain, provider,
SMTP connection details, the password encrypted by :mod:`consumer.vault`, ``active`` and
``sent_count``. Counting a turn is a conditional increment of ``sent_count``, so workers
everywhere take turns (round robin); :mod:`consumer.service.picker` decides which provider may
send.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pydantic import SecretStr
from pymongo import UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from consumer.clock import utcnow
from consumer.core.outboxes import DEFAULT_SENDMAIL, Outbox
from consumer.errors import ConfigurationError
from consumer.store.batches import Batcher
from consumer.store.documents import Document, answering
from consumer.vault import Vault

# Fields never printed: the encrypted password stays in the database.
HIDDEN = {"password": 0}
# Attempts at taking an outbox's turn before settling for an unguarded increment.
TURN_TRIES = 20
# Least used first; the name breaks ties so every worker sees the same order.
_ORDER = [("sent_count", 1), ("_id", 1)]
# A domain with a single active outbox (no turns to take among several) is answered from
# memory for this long after it was read: an outbox added, changed, disabled or removed
# reaches a worker within it. Domains with several are read for every batch of jobs.
SOLE_OUTBOX_SECONDS = 1.0


def outbox_document(
    outbox: Outbox, domain: str, provider: str | None, vault: Vault | None, now: datetime
) -> Document:
    """The stored form of ``outbox`` (its password encrypted, never in clear)."""
    doc: Document = {
        "_id": outbox.name,
        "domain": domain.lower(),
        "provider": provider,
        "transport": outbox.transport,
        "command": outbox.command if outbox.transport == "sendmail" else None,
        "host": outbox.host,
        "port": outbox.port,
        "security": outbox.security,
        "username": outbox.username,
        "verify_tls": outbox.verify_tls,
        "timeout": outbox.timeout,
        "max_connections": outbox.max_connections,
        "charset": outbox.charset,
        "updated_at": now,
    }
    if outbox.password is not None:
        if vault is None:
            raise ConfigurationError("MAILBUS_SECRET_KEY is needed to store a password")
        doc["password"] = vault.encrypt(outbox.password.get_secret_value())
    return doc


def outbox_from_document(doc: Document, vault: Vault | None) -> Outbox:
    """The :class:`Outbox` a stored document describes, its password decrypted."""
    password = None
    if doc.get("password"):
        if vault is None:
            raise ConfigurationError(
                f"outbox {doc['_id']} has a password but MAILBUS_SECRET_KEY is not set"
            )
        password = SecretStr(vault.decrypt(doc["password"]))
    return Outbox(
        name=doc["_id"],
        host=doc["host"],
        port=int(doc["port"]),
        security=doc["security"],
        username=doc.get("username"),
        password=password,
        verify_tls=bool(doc.get("verify_tls", True)),
        timeout=float(doc.get("timeout", 30.0)),
        max_connections=doc.get("max_connections"),
        version=int(doc.get("version", 0)),
        transport="sendmail" if doc.get("transport") == "sendmail" else "smtp",
        command=doc.get("command") or DEFAULT_SENDMAIL,
        charset=doc.get("charset"),
        provider=doc.get("provider"),
    )


class OutboxStore:
    """The ``outboxes`` collection."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self.outboxes = database["outboxes"]
        # Every job looks up its domain's outboxes: concurrent lookups share one query.
        self._lookups = Batcher(self._find_active)
        self._counts = Batcher(self._add_counts)
        self._sole: dict[str, tuple[float, Document]] = {}

    async def ensure_indexes(self) -> None:
        """The index choosing an outbox relies on; idempotent."""
        async with answering():
            await self.outboxes.create_index([("domain", 1), ("active", 1), ("sent_count", 1)])

    async def put(self, doc: Document, replace: bool) -> bool:
        """Store an outbox; an existing one is replaced only with ``replace`` (its count and
        state are kept). False when it exists and ``replace`` is off.
        """
        now = doc["updated_at"]
        async with answering():
            if not replace:
                try:
                    await self.outboxes.insert_one(
                        {**doc, "active": True, "sent_count": 0, "version": 1, "created_at": now}
                    )
                except DuplicateKeyError:
                    return False
                return True
            fields = {k: v for k, v in doc.items() if k != "_id"}
            unset = {} if "password" in doc else {"password": ""}
            await self.outboxes.update_one(
                {"_id": doc["_id"]},
                {
                    "$set": fields,
                    "$inc": {"version": 1},
                    "$setOnInsert": {"active": True, "sent_count": 0, "created_at": now},
                    **({"$unset": unset} if unset else {}),
                },
                upsert=True,
            )
            return True

    async def find(self, domain: str | None = None, encrypted: bool = False) -> list[Document]:
        """Outboxes by domain then name; their encrypted passwords only with ``encrypted``
        (for re-encrypting, never printing).
        """
        query = {"domain": domain.lower()} if domain else {}
        async with answering():
            cursor = self.outboxes.find(query, None if encrypted else HIDDEN)
            cursor = cursor.sort([("domain", 1), ("_id", 1)])
            return [doc async for doc in cursor]

    async def get(self, name: str) -> Document | None:
        """One outbox, with its encrypted password (for building a client, never printing)."""
        async with answering():
            return await self.outboxes.find_one({"_id": name})

    async def set_active(self, name: str, active: bool) -> bool:
        """Enable or disable; False if there is no such outbox."""
        async with answering():
            result = await self.outboxes.update_one(
                {"_id": name},
                {"$set": {"active": active, "updated_at": utcnow()}, "$inc": {"version": 1}},
            )
        return result.matched_count == 1

    async def store_password(self, name: str, token: str) -> None:
        """Replace the encrypted password (same secret, for a key rotation)."""
        async with answering():
            await self.outboxes.update_one(
                {"_id": name}, {"$set": {"password": token, "updated_at": utcnow()}}
            )

    async def remove(self, name: str) -> bool:
        """Delete; False if there is no such outbox."""
        async with answering():
            result = await self.outboxes.delete_one({"_id": name})
        return result.deleted_count == 1

    async def active(self, domain: str) -> list[Document]:
        """The domain's active outboxes, least used first (a sole one as read at most
        :data:`SOLE_OUTBOX_SECONDS` ago).
        """
        domain = domain.lower()
        kept = self._sole.get(domain)
        if kept is not None and time.monotonic() - kept[0] < SOLE_OUTBOX_SECONDS:
            return [kept[1]]
        found = await self._lookups.submit(domain)
        if len(found) == 1:
            self._sole[domain] = (time.monotonic(), found[0])
        else:
            self._sole.pop(domain, None)
        return found

    async def _find_active(self, domains: Sequence[str]) -> list[list[Document]]:
        """For each domain, its active outboxes least used first: one query for all."""
        query = {"domain": {"$in": sorted(set(domains))}, "active": True}
        by_domain: defaultdict[str, list[Document]] = defaultdict(list)
        async with answering():
            async for doc in self.outboxes.find(query).sort(_ORDER):
                by_domain[doc["domain"]].append(doc)
        # Each asker gets lists of its own: callers may reorder them.
        return [list(by_domain[domain]) for domain in domains]

    async def count_turn(
        self, doc: Document, avoid: str | None = None, guarded: bool = True
    ) -> Document:
        """Count one send through ``doc``, or through the outbox of the same domain and
        provider whose turn it turns out to be; returns the outbox counted.

        The increment is conditional on the count read, so concurrent choosers never both
        take the same turn: counts of the outboxes sharing a provider never drift more than
        one apart, in any number of workers. ``avoid`` stays passed over unless ``doc`` is it.
        Without ``guarded`` (``doc`` is the only candidate) it is counted outright.
        """
        query: Document = {
            "domain": doc["domain"],
            "active": True,
            "provider": doc.get("provider"),
        }
        if avoid is not None and doc["_id"] != avoid:
            query["_id"] = {"$ne": avoid}
        if not guarded:
            await self._counts.submit(doc["_id"])
            return doc
        async with answering():
            for _ in range(TURN_TRIES):
                taken = await self.outboxes.update_one(
                    {"_id": doc["_id"], "sent_count": doc.get("sent_count", 0)},
                    {"$inc": {"sent_count": 1}},
                )
                if taken.modified_count == 1:
                    return doc
                latest = await self.outboxes.find_one(query, sort=_ORDER)
                if latest is None:  # disabled meanwhile: it was this job's turn all the same
                    break
                doc = latest
            # Heavy contention: count it without the guarantee.
            await self.outboxes.update_one({"_id": doc["_id"]}, {"$inc": {"sent_count": 1}})
            return doc

    async def _add_counts(self, names: Sequence[str]) -> list[None]:
        """Count one send per name (repeats add up): one command for all."""
        sends = Counter(names)
        updates = [
            UpdateOne({"_id": name}, {"$inc": {"sent_count": n}}) for name, n in sends.items()
        ]
        async with answering():
            await self.outboxes.bulk_write(updates, ordered=False)
        return [None] * len(names)


def describe(doc: dict[str, Any]) -> dict[str, Any]:
    """An outbox document fit for printing: the password only as present or not."""
    shown = {k: v for k, v in doc.items() if k != "password"}
    shown["password"] = "set" if doc.get("password") else None
    return shown
