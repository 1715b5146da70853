"""Job state in MongoDB: the claim that keeps a job from being sent twice, and its outcome.

A job moves ``queued|scheduled -> sending -> sent|scheduled|failed|dead``. Claiming is one
conditional upsert on the job id; a claim is a lease, so a job whose worker died is
claimable again once the lease runs out.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import AsyncMongoClient, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import ConnectionFailure, DuplicateKeyError, PyMongoError

from consumer.errors import StoreUnavailableError
from consumer.message import Job
from consumer.settings import Settings

HISTORY_LENGTH = 20
CLAIMABLE = ("queued", "scheduled")
Document = dict[str, Any]


class ClaimState(enum.Enum):
    """What :meth:`JobStore.claim` found."""

    CLAIMED = "claimed"
    DONE = "done"
    LEASED = "leased"


@dataclass(frozen=True)
class Claim:
    """The result of a claim: whether this worker may send, and the job's counters."""

    state: ClaimState
    status: str
    attempts: int
    lease_until: datetime | None = None


def utcnow() -> datetime:
    """The current time, timezone-aware (UTC)."""
    return datetime.now(UTC)


@asynccontextmanager
async def _answering() -> AsyncIterator[None]:
    """Turn "MongoDB is unreachable or slow" into :class:`StoreUnavailableError`."""
    try:
        yield
    except ConnectionFailure as exc:
        raise StoreUnavailableError(f"MongoDB unavailable: {type(exc).__name__}") from exc
    except PyMongoError as exc:
        if exc.timeout:
            raise StoreUnavailableError(f"MongoDB timed out: {type(exc).__name__}") from exc
        raise


def _history(event: str, now: datetime, **fields: Any) -> Document:
    return {"$each": [{"at": now, "event": event, **fields}], "$slice": -HISTORY_LENGTH}


class JobStore:
    """The ``jobs`` collection, seen from a worker."""

    def __init__(self, client: AsyncMongoClient[Document], settings: Settings) -> None:
        self.client = client
        self.jobs: AsyncCollection[Document] = client[settings.mongo_db]["jobs"]
        self._lease = timedelta(seconds=settings.lease_seconds)
        self._retention = timedelta(days=settings.retention_days)

    @classmethod
    def connect(cls, settings: Settings) -> JobStore:
        """Create the client (it connects lazily and reconnects by itself)."""
        timeout_ms = int(settings.store_timeout * 1000)
        client: AsyncMongoClient[Document] = AsyncMongoClient(
            settings.mongo_url.get_secret_value(),
            tz_aware=True,
            serverSelectionTimeoutMS=timeout_ms,
            timeoutMS=timeout_ms,
            appname="mailbus",
        )
        return cls(client, settings)

    async def close(self) -> None:
        """Close the client's connections."""
        await self.client.close()

    async def ensure_indexes(self) -> None:
        """Declare the indexes every query relies on; idempotent."""
        async with _answering():
            await self.jobs.create_index("expire_at", expireAfterSeconds=0)
            await self.jobs.create_index([("status", 1), ("due_at", 1)])

    async def ping(self) -> None:
        """Round-trip to the server; raises :class:`StoreUnavailableError` if it is down."""
        async with _answering():
            await self.client.admin.command("ping")

    async def claim(self, job_id: str, job: Job, worker_id: str) -> Claim:
        """Take the job for sending, creating its record on first sight."""
        now = utcnow()
        query = {
            "_id": job_id,
            "$or": [
                {"status": {"$in": list(CLAIMABLE)}},
                {"status": "sending", "lease_until": {"$lte": now}},
            ],
        }
        update = {
            "$set": {
                "status": "sending",
                "lease_until": now + self._lease,
                "worker": worker_id,
                "updated_at": now,
            },
            "$inc": {"attempts": 1},
            "$setOnInsert": {
                "created_at": now,
                "domain": job.domain,
                "from": job.from_.email,
                "subject": job.subject,
                "recipients": len(job.recipients()),
                "tags": job.tags,
            },
            "$push": {"history": _history("claimed", now, worker=worker_id)},
        }
        async with _answering():
            try:
                doc = await self.jobs.find_one_and_update(
                    query, update, upsert=True, return_document=ReturnDocument.AFTER
                )
            except DuplicateKeyError:
                doc = None
            if doc is not None:
                return Claim(ClaimState.CLAIMED, "sending", int(doc["attempts"]))
            found = await self.jobs.find_one(
                {"_id": job_id}, {"status": 1, "attempts": 1, "lease_until": 1}
            )
        if found is None:  # removed by retention between the two calls: claim anew
            return await self.claim(job_id, job, worker_id)
        state = ClaimState.LEASED if found["status"] == "sending" else ClaimState.DONE
        return Claim(
            state, found["status"], int(found.get("attempts", 0)), found.get("lease_until")
        )

    async def mark_sent(
        self, job_id: str, worker_id: str, reply: Document, refused: dict[str, Document]
    ) -> bool:
        """Record the SMTP server's acceptance; False if this worker had lost its lease."""
        now = utcnow()
        async with _answering():
            result = await self.jobs.update_one(
                {"_id": job_id, "worker": worker_id, "status": "sending"},
                {
                    "$set": {
                        "status": "sent",
                        "sent_at": now,
                        "updated_at": now,
                        "smtp": reply,
                        "refused": refused,
                        "expire_at": now + self._retention,
                    },
                    "$unset": {"lease_until": ""},
                    "$push": {"history": _history("sent", now, smtp=reply)},
                },
            )
        return result.modified_count == 1

    async def mark_retry(self, job_id: str, worker_id: str, error: str, due_at: datetime) -> None:
        """The attempt failed transiently: the job waits for ``due_at``."""
        now = utcnow()
        async with _answering():
            await self.jobs.update_one(
                {"_id": job_id, "worker": worker_id, "status": "sending"},
                {
                    "$set": {
                        "status": "scheduled",
                        "due_at": due_at,
                        "updated_at": now,
                        "last_error": error,
                    },
                    "$unset": {"lease_until": ""},
                    "$push": {"history": _history("deferred", now, error=error, due_at=due_at)},
                },
            )

    async def mark_failed(
        self, job_id: str, worker_id: str, status: str, reason: str, error: str
    ) -> None:
        """The claimed job will never be sent: record ``failed`` or ``dead`` and why."""
        now = utcnow()
        async with _answering():
            await self.jobs.update_one(
                {"_id": job_id, "worker": worker_id, "status": "sending"},
                {
                    "$set": {
                        "status": status,
                        "reason": reason,
                        "last_error": error,
                        "updated_at": now,
                        "expire_at": now + self._retention,
                    },
                    "$unset": {"lease_until": ""},
                    "$push": {"history": _history(status, now, reason=reason, error=error)},
                },
            )

    async def record_dead(self, job_id: str, reason: str, error: str) -> None:
        """Record a job that was dead-lettered before any claim (for example, expired)."""
        now = utcnow()
        async with _answering():
            # A duplicate key means the job is already sent, sending or dead: that record
            # stays the truth.
            with contextlib.suppress(DuplicateKeyError):
                await self.jobs.update_one(
                    {"_id": job_id, "status": {"$in": list(CLAIMABLE)}},
                    {
                        "$set": {
                            "status": "dead",
                            "reason": reason,
                            "last_error": error,
                            "updated_at": now,
                            "expire_at": now + self._retention,
                        },
                        "$setOnInsert": {"created_at": now, "attempts": 0},
                        "$push": {"history": _history("dead", now, reason=reason)},
                    },
                    upsert=True,
                )

    async def get(self, job_id: str) -> Document | None:
        """The job's record, or None."""
        async with _answering():
            return await self.jobs.find_one({"_id": job_id})
