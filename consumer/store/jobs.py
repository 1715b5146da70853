"""Job state in MongoDB: the claim that keeps a job from being sent twice, and its outcome.

A job moves ``scheduled -> sending -> sent|scheduled|failed|dead``, or to ``cancelled``
while it waits. Claiming is one conditional upsert on the job id; a claim is a lease, so
a job whose worker died is claimable again once the lease runs out. The record, not any
message in flight, is the truth: a scheduled job is claimable only once its ``due_at``
has come, so a copy of a cancelled or rescheduled job is dropped or carried on.

``ready_at`` says when a record may next be claimed: its due time while scheduled, its
lease's end while sending, absent once final. The claim filter is then the job id and one
range, which every MongoDB-compatible server answers from the ``_id`` index.

Every time a record holds is read on one clock, the store's (see
:mod:`consumer.clock`): a worker whose clock runs behind MongoDB's still claims a
due job on time, and takes a lease over when it has run out for everyone. A lease is
short (``MAILBUS_LEASE_SECONDS``) and renewed while its worker holds the job
(:meth:`JobStore.renew`), so a dead worker's jobs move on within seconds. A claim is also
where a job's attempts are counted and bounded: past its last one, whatever brought it
back (a worker that died mid-send, a crash, a lease let go), it is recorded ``dead``
(``delivery_limit``) instead.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, TypedDict, cast, overload

from pymongo import AsyncMongoClient, ReturnDocument, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError

from consumer.clock import utcnow
from consumer.core.leases import Release
from consumer.core.message import Job
from consumer.core.ratelimit import Reservation
from consumer.core.returns import JobRef, search_key
from consumer.core.schedule import CLAIM_AHEAD
from consumer.core.vocabulary import (
    STATUSES,
    WAITING,
    DeadReason,
    FinalStatus,
    JobStatus,
    final_status,
)
from consumer.errors import StoreUnavailableError
from consumer.settings import Settings
from consumer.store.batches import Batcher
from consumer.store.commands import CommandCounter
from consumer.store.documents import Document, answering

HISTORY_LENGTH = 20
# Bounces and complaints a record keeps (the latest), in ``feedback``.
FEEDBACK_LENGTH = 20
# The longest SMTP reply or error text a record keeps (a server's text is not bounded).
REPLY_LENGTH = 500
# The envelope recipients a record can be found by: the first ones of a larger job.
SEARCH_RECIPIENTS = 100
# The most records one listing returns.
MAX_PAGE = 1000
# A scheduled job whose due time is this close is claimable: copies arrive a hair early.
DUE_TOLERANCE = timedelta(milliseconds=5)
DUPLICATE_KEY = 11000
# Fields never shown in listings: the stored job body and the history.
_BULKY = {"body": 0, "history": 0}


class ClaimState(enum.Enum):
    """What :meth:`JobStore.claim` or :meth:`JobStore.schedule` found."""

    CLAIMED = "claimed"  # this worker holds the lease and may send
    SCHEDULED = "scheduled"  # first sight of a future job: its record now says so
    WAITING = "waiting"  # the record says the job is due later (``due_at``)
    LEASED = "leased"  # another worker is sending it (``lease_until``)
    DONE = "done"  # sent, failed, dead or cancelled: nothing more to do
    CONFLICT = "conflict"  # the id is taken by a job of another domain: never this one's
    EXHAUSTED = "exhausted"  # due again after its last attempt: now recorded dead


@dataclass(frozen=True)
class Claim:
    """What the job's record allows this worker to do, and its counters."""

    state: ClaimState
    status: JobStatus
    attempts: int
    lease_until: datetime | None = None
    due_at: datetime | None = None
    # Recipients still owed the mail after a partial delivery (None: all of them), and the
    # refusals recorded by earlier attempts.
    pending: tuple[str, ...] | None = None
    refused: Document | None = None
    # The outbox of the last attempt, which a retry avoids when the domain has another.
    last_outbox: str | None = None
    # A rate-limited job's place in its provider's queue (see consumer.core.ratelimit).
    reserved: Reservation | None = None


@dataclass(frozen=True)
class Change:
    """The result of a cancel or reschedule: whether it applied, and the record before it
    (None when there was no record).
    """

    applied: bool
    before: JobRecord | None


TimeField = Literal["created", "updated"]


@dataclass(frozen=True)
class JobFilter:
    """What ``mailbus jobs ls`` selects: every field given must hold.

    One of recipient, sender, tag and domain, in that order, is looked up in the
    ``search`` index; the others, and subject, outbox, status and the time range, are
    checked on the records that lookup (or the status or ``created_at`` index) finds.
    Addresses and domains compare in lower case, the subject as a case-insensitive prefix.
    """

    recipient: str | None = None
    sender: str | None = None
    tag: str | None = None
    domain: str | None = None
    subject: str | None = None
    outbox: str | None = None
    status: JobStatus | None = None
    since: datetime | None = None
    until: datetime | None = None
    # Which time ``since`` and ``until`` bound: when the job was first seen, or last changed.
    time: TimeField = "created"

    def query(self) -> Document:
        """The MongoDB filter; its first field is the one an index serves best (the test
        server plans with a filter's first indexed field).
        """
        # Each search key, and the same test on the record's own field for the ones after
        # the first (the recipient, when given, is always first).
        lookups: list[tuple[str, str, Any]] = []
        if self.recipient is not None:
            key = f"to:{self.recipient.lower()}"
            lookups.append((key, "search", key))
        if self.sender is not None:
            exactly = {"$regex": f"^{re.escape(self.sender)}$", "$options": "i"}
            lookups.append((f"from:{self.sender.lower()}", "from", exactly))
        if self.tag is not None:
            lookups.append((f"tag:{self.tag}", "tags", self.tag))
        if self.domain is not None:
            lookups.append((f"domain:{self.domain.lower()}", "domain", self.domain.lower()))
        query: Document = {"search": lookups[0][0]} if lookups else {}
        if self.status is not None:
            query["status"] = self.status
        span: Document = {}
        if self.since is not None:
            span["$gte"] = self.since
        if self.until is not None:
            span["$lte"] = self.until
        if span and self.time == "created":
            query["created_at"] = span
        elif span:
            query["updated_at"] = span
            if "$lte" in span:
                # Changed by then, so created by then: the created_at index bounds it.
                query["created_at"] = {"$lte": span["$lte"]}
        for _key, field, test in lookups[1:]:
            query[field] = test
        if self.subject is not None:
            query["subject"] = {"$regex": f"^{re.escape(self.subject)}", "$options": "i"}
        if self.outbox is not None:
            query["outbox"] = self.outbox
        return query


def exhausted_error(attempts: int) -> str:
    """Why a job was recorded dead at its claim: its last attempt never finished."""
    return f"{attempts} attempts made, the last never finished (its worker stopped mid-job)"


def _not_unavailable(exc: Exception) -> bool:
    """A batch not refused for MongoDB being away may have failed for one record's sake."""
    return not isinstance(exc, StoreUnavailableError)


def _history(event: str, now: datetime, **fields: Any) -> Document:
    return {"$each": [{"at": now, "event": event, **fields}], "$slice": -HISTORY_LENGTH}


def _bounded(text: str) -> str:
    return text if len(text) <= REPLY_LENGTH else text[: REPLY_LENGTH - 1] + "…"


def smtp_reply(code: int | None, message: str) -> Document | None:
    """An SMTP server's reply as records keep it (its text bounded); None without a code
    (nothing was said over SMTP: a connection error, a sendmail program).
    """
    return None if code is None else {"code": code, "message": _bounded(message)}


def _bounded_reply(reply: Document) -> Document:
    message = reply.get("message")
    return {**reply, "message": _bounded(message)} if isinstance(message, str) else reply


def _outcome_fields(error: str, reply: Document | None) -> Document:
    """What a history entry says of a failed attempt: the error and, when the server said
    it, its reply.
    """
    return {"error": _bounded(error), **({"smtp": reply} if reply is not None else {})}


# Indexes earlier versions declared on ``jobs``, dropped as each cost every write.
_RETIRED_INDEXES = frozenset({"status_1_due_at_1", "updated_at_1"})

# A job's record as readers see it (``mailbus jobs``, control, status): one document per
# job id in the ``jobs`` collection. Fields appear as the job goes (``lease_until`` while
# it is held, ``body`` while it waits, ``reason`` once it is dead or failed...).
JobRecord = TypedDict(
    "JobRecord",
    {
        "_id": str,
        "status": JobStatus,
        "domain": str | None,
        "from": str,
        "subject": str | None,
        "recipients": int,
        "search": list[str],
        "tags": list[str],
        "metadata": dict[str, Any],
        "created_at": datetime,
        "updated_at": datetime,
        "attempts": int,
        "worker": str,
        "lease_until": datetime,
        "due_at": datetime,
        "ready_at": datetime,
        "body": bytes,
        "pending": list[str],
        "refused": dict[str, Any],
        "reserved": dict[str, Any],
        "reschedules": int,
        "outbox": str | None,
        "smtp": dict[str, Any],
        "sent_at": datetime,
        "reason": DeadReason,
        "last_error": str,
        "suppressed": list[str],
        "template": dict[str, Any],
        "sandbox": bool,
        "expire_at": datetime,
        "history": list[dict[str, Any]],
        "feedback": list[dict[str, Any]],
    },
    total=False,
)


@overload
def _record(doc: Document) -> JobRecord: ...
@overload
def _record(doc: Document | None) -> JobRecord | None: ...
def _record(doc: Document | None) -> JobRecord | None:
    """A document of the ``jobs`` collection, as the record it is: a sent record's history
    ends with its ``sent`` entry, made here from ``sent_at`` and ``smtp`` (written as
    fields only, they spare every mail's last write a push onto the history array).
    """
    if doc is not None and doc.get("status") == "sent" and "history" in doc:
        history = doc["history"]
        if not history or history[-1].get("event") != "sent":
            entry = {"at": doc.get("sent_at"), "event": "sent", "smtp": doc.get("smtp")}
            doc["history"] = [*history, entry][-HISTORY_LENGTH:]
    return cast(JobRecord | None, doc)


def _summary(job_id: str, job: Job, now: datetime) -> Document:
    """The fields a new record starts with, shown by ``mailbus jobs ls`` (``sandbox``
    only for a job that says so; its domain's flag is written when it is sent). An id too
    long for a return address adds the search key its bounces find the record by.
    """
    recipients = job.recipients()
    sender = job.envelope_sender()
    summary: Document = {
        "created_at": now,
        "domain": job.domain,
        "from": sender,
        "subject": job.subject_line(),
        "recipients": len(recipients),
        "search": _search_keys(job.domain, sender, recipients, job.tags, search_key(job_id)),
        "tags": job.tags,
        "metadata": job.metadata,
    }
    if job.sandbox:
        summary["sandbox"] = True
    return summary


def _search_keys(
    domain: str, sender: str, recipients: list[str], tags: list[str], returned: str | None
) -> list[str]:
    """The keys a listing finds a record by, all in one multikey index (one index costs
    every write less than one per filter: see :meth:`JobStore.ensure_indexes`).
    Addresses in lower case; recipients bounded by :data:`SEARCH_RECIPIENTS`.
    """
    keys = [f"to:{r.lower()}" for r in recipients[:SEARCH_RECIPIENTS]]
    keys += [f"from:{sender.lower()}", f"domain:{domain}"]
    keys += [f"tag:{t}" for t in tags]
    if returned is not None:
        keys.append(returned)
    return list(dict.fromkeys(keys))


def _held(job_id: str | Document, worker_id: str) -> Document:
    """The filter of a job (or jobs: ``{"$in": [...]}``) this worker holds: claimed by it
    and still being sent. Every write of an attempt's result goes through it, so a worker
    that lost its lease changes nothing.
    """
    return {"_id": job_id, "worker": worker_id, "status": "sending"}


# What a final record (sent, failed, dead, cancelled) lets go of: the fields of a job still
# on its way (its lease, wake-up time, body, place in a provider's queue). It keeps what it
# was and why (status, reason, last_error, smtp, refused, outbox, attempts, domain,
# history) until ``expire_at``, the retention after it ended, and, unless it was sent,
# ``pending``: who was still owed the mail after a partial delivery.
_WORKING_FIELDS = ("lease_until", "ready_at", "body", "reserved")


def _finished(
    status: FinalStatus, now: datetime, retention: timedelta, fields: Document, **noted: Any
) -> Document:
    """The update that makes a record final with ``fields`` set, its history noting it
    (a sent one's entry is made when it is read: see :func:`_record`).
    """
    update: Document = {
        "$set": {**fields, "status": status, "updated_at": now, "expire_at": now + retention},
        "$unset": dict.fromkeys(_WORKING_FIELDS + (("pending",) if status == "sent" else ()), ""),
    }
    if status != "sent":
        update["$push"] = {"history": _history(status, now, **noted)}
    return update


def _same_domain(domain: str) -> Document:
    """A filter for records of ``domain``'s jobs, and those no domain has taken (a cancel
    of a job not seen yet, made by an operator).
    """
    return {"$in": [domain, None]}


def _found(doc: Document, domain: str) -> Claim:
    """Translate an existing record that could not be claimed into a :class:`Claim`."""
    status = doc["status"]
    attempts = int(doc.get("attempts", 0))
    if doc.get("domain") not in (None, domain):
        return Claim(ClaimState.CONFLICT, status, attempts)
    if status == "sending":
        return Claim(ClaimState.LEASED, status, attempts, lease_until=doc.get("lease_until"))
    if status in WAITING:
        # A replayed record has no due time, only the moment it may be claimed from.
        due_at = doc.get("due_at") or doc.get("ready_at")
        return Claim(ClaimState.WAITING, status, attempts, due_at=due_at)
    return Claim(ClaimState.DONE, status, attempts)


class JobStore:
    """The ``jobs`` collection, seen from a worker."""

    def __init__(
        self,
        client: AsyncMongoClient[Document],
        settings: Settings,
        commands: CommandCounter | None = None,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        """``clock`` tells the store's time (a worker's :class:`~consumer.clock.StoreClock`);
        without one, this machine's clock is taken for it.
        """
        self.client = client
        self.now = clock or utcnow
        # What the client sends, when it was made with this counter as a listener.
        self.commands = commands or CommandCounter()
        self.database: AsyncDatabase[Document] = client[settings.mongo_db]
        self.jobs: AsyncCollection[Document] = self.database["jobs"]
        self._lease = timedelta(seconds=settings.lease_seconds)
        self._max_attempts = settings.max_attempts
        self._retention = timedelta(days=settings.retention_days)
        # Claims of new jobs and "sent" records go to MongoDB in batches (group commit).
        self._new_claims = Batcher(self._insert_new, split=_not_unavailable)
        self._sent_records = Batcher(self._write_sent, split=_not_unavailable)

    @classmethod
    def connect(
        cls, settings: Settings, *, clock: Callable[[], datetime] | None = None
    ) -> JobStore:
        """Create the client (it connects lazily and reconnects by itself); ``clock`` as
        for the constructor.
        """
        timeout_ms = int(settings.store_timeout * 1000)
        commands = CommandCounter()
        client: AsyncMongoClient[Document] = AsyncMongoClient(
            settings.mongo_url.get_secret_value(),
            tz_aware=True,
            serverSelectionTimeoutMS=timeout_ms,
            timeoutMS=timeout_ms,
            appname="mailbus",
            event_listeners=[commands],
        )
        return cls(client, settings, commands, clock=clock)

    async def close(self) -> None:
        """Close the client's connections."""
        await self.client.close()

    async def __aenter__(self) -> JobStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def ensure_indexes(self) -> None:
        """Declare the indexes the queries rely on, and drop those an earlier version made;
        idempotent.

        Every secondary index costs each of a mail's writes (about 0.3 ms of the test
        server's CPU per mail each, measured by ``make bench``), so the records carry four:
        the TTL; (status, updated_at), which serves a listing by status, today's counts
        and the last errors; ``created_at``, the order of listings, their pages and a
        time range; and ``search``, one multikey index over the keys a listing finds a
        record by (recipients, sender, tags, domain: see :class:`JobFilter`), cheaper
        than an index for each.
        """
        async with answering():
            await self.jobs.create_index("expire_at", expireAfterSeconds=0)
            await self.jobs.create_index([("status", 1), ("updated_at", -1)])
            await self.jobs.create_index("created_at")
            await self.jobs.create_index("search")
            existing = await self.jobs.index_information()
            for name in _RETIRED_INDEXES & existing.keys():
                await self.jobs.drop_index(name)

    async def ping(self) -> None:
        """Round-trip to the server; raises :class:`StoreUnavailableError` if it is down."""
        async with answering():
            await self.client.admin.command("ping")

    async def server_time(self) -> datetime:
        """The server's clock (``hello.localTime``, to the millisecond)."""
        async with answering():
            # With the client's codec options: commands default to naive datetimes.
            hello = await self.client.admin.command(
                "hello", codec_options=self.client.codec_options
            )
        local: datetime = hello["localTime"]
        return local

    async def claim(
        self,
        job_id: str,
        job: Job,
        worker_id: str,
        recorded: bool = False,
        release: Release | None = None,
        ahead: bool = False,
    ) -> Claim:
        """Take the job for sending if its record allows it, creating the record on first sight.

        A new job (the common case) is claimed by inserting its record, in a batch with
        other new jobs; a job that has a record already is claimed by a conditional update,
        at once when the caller knows it is ``recorded`` (no insert is tried first). A lease
        let go of by ``release`` (see :mod:`consumer.core.leases`) is taken over at once. A job
        that has had its :meth:`attempt_limit` of claims is not claimed again: it is
        recorded dead (:attr:`ClaimState.EXHAUSTED`). With ``ahead``, a waiting record due
        within :data:`CLAIM_AHEAD` is claimed before its time (a lease never is).
        """
        if recorded:
            return await self._claim_existing(job_id, job, worker_id, release, ahead)
        now = self.now()
        lease_until = now + self._lease
        record = {
            "_id": job_id,
            **_summary(job_id, job, now),
            "status": "sending",
            "lease_until": lease_until,
            "ready_at": lease_until,
            "worker": worker_id,
            "updated_at": now,
            "attempts": 1,
            "history": [{"at": now, "event": "claimed", "worker": worker_id}],
        }
        if await self._new_claims.submit(record):
            return Claim(ClaimState.CLAIMED, "sending", 1)
        return await self._claim_existing(job_id, job, worker_id, release, ahead)

    async def _insert_new(self, records: Sequence[Document]) -> list[bool]:
        """Insert ``records``; for each, False when its job has a record already."""
        async with answering():
            try:
                await self.jobs.insert_many(records, ordered=False)
            except BulkWriteError as exc:
                errors = exc.details.get("writeErrors", [])
                if any(error.get("code") != DUPLICATE_KEY for error in errors):
                    raise
                existing = {error["index"] for error in errors}
                return [index not in existing for index in range(len(records))]
        return [True] * len(records)

    async def _claim_existing(
        self, job_id: str, job: Job, worker_id: str, release: Release | None, ahead: bool
    ) -> Claim:
        now = self.now()
        ready: Document = {"ready_at": {"$lte": now + DUE_TOLERANCE}}
        if ahead:
            # Only a waiting record is taken before its time, never a lease: once a cancel
            # has answered "cancelled", nothing sends the job.
            soon = now + CLAIM_AHEAD + DUE_TOLERANCE
            ready = {"ready_at": {"$lte": soon}, "status": {"$in": list(WAITING)}}
        # A record of another domain's job never matches: the upsert then fails on the id.
        query: Document = {"_id": job_id, "domain": _same_domain(job.domain), **ready}
        if release is not None:
            # Still the releasing worker's lease, untouched by it since it let go.
            let_go = {
                "status": "sending",
                "worker": release.worker,
                "updated_at": {"$lte": release.at},
            }
            query = {"_id": job_id, "domain": query["domain"], "$or": [ready, let_go]}
        limit = self.attempt_limit(job)
        lease_until = now + self._lease
        update = {
            "$set": {
                "status": "sending",
                "lease_until": lease_until,
                "ready_at": lease_until,
                "worker": worker_id,
                "updated_at": now,
            },
            "$inc": {"attempts": 1},
            "$setOnInsert": _summary(job_id, job, now),
            "$push": {"history": _history("claimed", now, worker=worker_id)},
        }
        async with answering():
            # update_one rather than find_one_and_update: some MongoDB-compatible servers
            # scan on findAndModify. The upsert covers a record removed since the insert.
            try:
                result = await self.jobs.update_one(
                    {**query, "attempts": {"$lt": limit}}, update, upsert=True
                )
            except DuplicateKeyError:
                result = None
            if result is not None and result.upserted_id is not None:
                return Claim(ClaimState.CLAIMED, "sending", 1)
            if result is not None and result.modified_count == 1:
                # The lease is ours, so nobody else changes these before this read.
                doc = await self.jobs.find_one(
                    {"_id": job_id},
                    {"attempts": 1, "pending": 1, "refused": 1, "outbox": 1, "reserved": 1},
                ) or {"attempts": 1}
                pending, reserved = doc.get("pending"), doc.get("reserved")
                return Claim(
                    ClaimState.CLAIMED,
                    "sending",
                    int(doc["attempts"]),
                    pending=tuple(pending) if pending is not None else None,
                    refused=doc.get("refused"),
                    last_outbox=doc.get("outbox"),
                    reserved=Reservation(**reserved) if reserved is not None else None,
                )
            found = await self._lookup(job_id)
            attempts = int(found.get("attempts", 0)) if found is not None else 0
            spent = (
                found is not None and final_status(found["status"]) is None and attempts >= limit
            )
            if spent and await self._exhaust(query, limit, attempts, now):
                return Claim(ClaimState.EXHAUSTED, "dead", attempts)
        if found is None:  # removed by retention between the two calls: claim anew
            return await self._claim_existing(job_id, job, worker_id, release, ahead)
        return _found(found, job.domain)

    def attempt_limit(self, job: Job) -> int:
        """How many times ``job`` may be claimed: its own ``max_attempts``, else
        ``MAILBUS_MAX_ATTEMPTS``.
        """
        return job.max_attempts or self._max_attempts

    async def _exhaust(self, claimable: Document, limit: int, attempts: int, now: datetime) -> bool:
        """Record dead the job ``claimable`` matches if it has had ``limit`` claims (its
        record said ``attempts``); True if this call did.
        """
        error = exhausted_error(attempts)
        result = await self.jobs.update_one(
            {**claimable, "attempts": {"$gte": limit}},
            _finished(
                "dead",
                now,
                self._retention,
                {"reason": "delivery_limit", "last_error": error},
                reason="delivery_limit",
            ),
        )
        return result.modified_count == 1

    async def renew(self, job_ids: Collection[str], worker_id: str) -> int:
        """Extend the leases ``worker_id`` holds on ``job_ids`` to a whole lease from now,
        in one update; how many it still held. ``updated_at`` stays: a renewal changes
        nothing a reader of the record cares about, nor whether a release still holds.
        """
        if not job_ids:
            return 0
        lease_until = self.now() + self._lease
        async with answering():
            result = await self.jobs.update_many(
                _held({"$in": list(job_ids)}, worker_id),
                {"$set": {"lease_until": lease_until, "ready_at": lease_until}},
            )
        return result.modified_count

    async def schedule(self, job_id: str, job: Job, body: bytes, due_at: datetime) -> Claim:
        """Record a job first seen before its due time, keeping its body for a reschedule.

        An existing record wins (a duplicate or redelivered message follows it).
        """
        now = self.now()
        record = {
            **_summary(job_id, job, now),
            "status": "scheduled",
            "due_at": due_at,
            "ready_at": due_at,
            "attempts": 0,
            "updated_at": now,
            "body": body,
            "history": [{"at": now, "event": "scheduled", "due_at": due_at}],
        }
        async with answering():
            try:
                result = await self.jobs.update_one(
                    {"_id": job_id}, {"$setOnInsert": record}, upsert=True
                )
            except DuplicateKeyError:
                created = False
            else:
                created = result.upserted_id is not None
            if created:
                return Claim(ClaimState.SCHEDULED, "scheduled", 0, due_at=due_at)
            found = await self._lookup(job_id)
        if found is None:
            return await self.schedule(job_id, job, body, due_at)
        return _found(found, job.domain)

    async def _lookup(self, job_id: str) -> Document | None:
        return await self.jobs.find_one(
            {"_id": job_id},
            {"status": 1, "attempts": 1, "lease_until": 1, "due_at": 1, "domain": 1},
        )

    async def mark_sent(
        self,
        job_id: str,
        worker_id: str,
        reply: Document,
        refused: dict[str, Document],
        outbox: str | None = None,
        details: Document | None = None,
    ) -> bool:
        """Record the SMTP server's acceptance; False if this worker had lost its lease.

        ``details`` are more fields to set (the template used, suppressed recipients).
        """
        now = self.now()
        return await self._sent_records.submit(
            (
                job_id,
                worker_id,
                _finished(
                    "sent",
                    now,
                    self._retention,
                    {
                        **(details or {}),
                        "sent_at": now,
                        "smtp": _bounded_reply(reply),
                        "refused": refused,
                        "outbox": outbox,
                    },
                ),
            )
        )

    async def _write_sent(self, records: Sequence[tuple[str, str, Document]]) -> list[bool]:
        """Apply ``(job id, worker id, update)`` records of sends together; for each, False
        if that worker had lost its lease.
        """
        updates = [
            UpdateOne(_held(job_id, worker_id), update) for job_id, worker_id, update in records
        ]
        async with answering():
            result = await self.jobs.bulk_write(updates, ordered=False)
            if result.modified_count == len(updates):
                return [True] * len(updates)
            # Rare: some lease was lost. Which records did this batch write?
            workers = {job_id: worker_id for job_id, worker_id, _ in records}
            cursor = self.jobs.find({"_id": {"$in": list(workers)}}, {"status": 1, "worker": 1})
            ours = {
                doc["_id"]
                async for doc in cursor
                if doc.get("status") == "sent" and doc.get("worker") == workers[doc["_id"]]
            }
        return [job_id in ours for job_id, _, _ in records]

    async def mark_retry(
        self,
        job_id: str,
        worker_id: str,
        error: str,
        due_at: datetime,
        body: bytes,
        outbox: str | None = None,
        partial: tuple[list[str], Document] | None = None,
        *,
        reply: Document | None = None,
    ) -> None:
        """The attempt failed transiently: the job waits for ``due_at`` (and can be moved).

        ``partial``, after a delivery some recipients accepted: the recipients still owed
        the mail, and every refusal so far. ``reply``, the SMTP server's (see
        :func:`smtp_reply`), is kept in the attempt's history entry.
        """
        now = self.now()
        changes: Document = {
            "status": "scheduled",
            "due_at": due_at,
            "ready_at": due_at,
            "updated_at": now,
            "last_error": _bounded(error),
            "body": body,
            "outbox": outbox,
        }
        if partial is not None:
            changes["pending"], changes["refused"] = partial
        async with answering():
            await self.jobs.update_one(
                _held(job_id, worker_id),
                {
                    "$set": changes,
                    "$unset": {"lease_until": "", "reserved": ""},
                    "$push": {
                        "history": _history(
                            "deferred", now, **_outcome_fields(error, reply), due_at=due_at
                        )
                    },
                },
            )

    async def mark_throttled(
        self,
        job_id: str,
        worker_id: str,
        reservation: Reservation,
        due_at: datetime,
        body: bytes,
    ) -> None:
        """No outbox may send now: the job waits for its place in the provider's queue, and
        the attempt it was claimed for is given back (rate-limit waits never count).
        """
        now = self.now()
        async with answering():
            await self.jobs.update_one(
                _held(job_id, worker_id),
                {
                    "$set": {
                        "status": "scheduled",
                        "due_at": due_at,
                        "ready_at": due_at,
                        "updated_at": now,
                        "body": body,
                        "reserved": dataclasses.asdict(reservation),
                    },
                    "$inc": {"attempts": -1},
                    "$unset": {"lease_until": ""},
                    "$push": {
                        "history": _history(
                            "rate_limited", now, outbox=reservation.outbox, due_at=due_at
                        )
                    },
                },
            )

    async def mark_failed(
        self,
        job_id: str,
        worker_id: str,
        status: Literal["failed", "dead"],
        reason: DeadReason,
        error: str,
        details: Document | None = None,
        outbox: str | None = None,
        *,
        reply: Document | None = None,
    ) -> None:
        """The claimed job will never be sent: record ``failed`` or ``dead`` and why, and
        the outbox that refused it when one was chosen (else the last attempt's stays);
        ``reply``, the SMTP server's refusal, is kept in the history entry.
        """
        now = self.now()
        if outbox is not None:
            details = {**(details or {}), "outbox": outbox}
        async with answering():
            await self.jobs.update_one(
                _held(job_id, worker_id),
                _finished(
                    status,
                    now,
                    self._retention,
                    {**(details or {}), "reason": reason, "last_error": _bounded(error)},
                    reason=reason,
                    **_outcome_fields(error, reply),
                ),
            )

    async def record_dead(
        self, job_id: str, domain: str, reason: DeadReason, error: str
    ) -> Claim | None:
        """Record a job of ``domain`` dead-lettered before any claim (for example, expired);
        None when it is recorded so.

        Otherwise its record stays the truth and the claim says why: already sent,
        cancelled… (the message is only a stale copy), or taken by another domain's job.
        """
        now = self.now()
        async with answering():
            try:
                await self.jobs.update_one(
                    {
                        "_id": job_id,
                        "domain": _same_domain(domain),
                        "status": {"$in": list(WAITING)},
                    },
                    {
                        **_finished(
                            "dead",
                            now,
                            self._retention,
                            {"reason": reason, "last_error": error},
                            reason=reason,
                        ),
                        "$setOnInsert": {"created_at": now, "attempts": 0, "domain": domain},
                    },
                    upsert=True,
                )
            except DuplicateKeyError:
                found = await self._lookup(job_id)
                if found is None:
                    return await self.record_dead(job_id, domain, reason, error)
                return _found(found, domain)
        return None

    async def reopen(self, job_id: str) -> Change:
        """Make a ``failed`` or ``dead`` job claimable again with fresh attempts, for a replay.

        Any other record is left alone (a sent job stays sent: a replayed copy is skipped);
        ``before`` is the record as it was, None when there was none.
        """
        now = self.now()
        async with answering():
            before = await self.jobs.find_one_and_update(
                {"_id": job_id, "status": {"$in": ["failed", "dead"]}},
                {
                    "$set": {"status": "queued", "attempts": 0, "ready_at": now, "updated_at": now},
                    "$unset": {"reason": "", "last_error": "", "expire_at": "", "worker": ""},
                    "$push": {"history": _history("replayed", now)},
                },
                projection=_BULKY,
                return_document=ReturnDocument.BEFORE,
            )
            if before is not None:
                return Change(True, _record(before))
            return Change(False, _record(await self.jobs.find_one({"_id": job_id}, _BULKY)))

    async def cancel(self, job_id: str, domain: str | None = None) -> Change:
        """Cancel a waiting job (of ``domain``, when given). A job never seen yet gets a
        ``cancelled`` record of ``domain``, so that it is not sent if it arrives; a job
        being sent or done is left alone.
        """
        now = self.now()
        query: Document = {"_id": job_id, "status": {"$in": list(WAITING)}}
        if domain is not None:
            query["domain"] = _same_domain(domain)
        async with answering():
            before = await self.jobs.find_one_and_update(
                query,
                _finished("cancelled", now, self._retention, {}),
                projection=_BULKY,
                return_document=ReturnDocument.BEFORE,
            )
            if before is not None:
                return Change(True, _record(before))
            tombstone = {
                "_id": job_id,
                "status": "cancelled",
                "created_at": now,
                "updated_at": now,
                "attempts": 0,
                "expire_at": now + self._retention,
                "history": [{"at": now, "event": "cancelled", "before_seen": True}],
            }
            if domain is not None:
                tombstone["domain"] = domain
            try:
                await self.jobs.insert_one(tombstone)
            except DuplicateKeyError:
                return Change(False, _record(await self.jobs.find_one({"_id": job_id}, _BULKY)))
        return Change(True, None)

    async def reschedule(self, job_id: str, due_at: datetime) -> Change:
        """Move a scheduled job to ``due_at``; ``before`` carries the stored body.

        A place the job held in a provider's queue is let go: at its new time it is new.
        """
        now = self.now()
        async with answering():
            before = await self.jobs.find_one_and_update(
                {"_id": job_id, "status": "scheduled"},
                {
                    "$set": {"due_at": due_at, "ready_at": due_at, "updated_at": now},
                    "$unset": {"reserved": ""},
                    "$inc": {"reschedules": 1},
                    "$push": {"history": _history("rescheduled", now, due_at=due_at)},
                },
                projection={"history": 0},
                return_document=ReturnDocument.BEFORE,
            )
            if before is not None:
                return Change(True, _record(before))
            return Change(False, _record(await self.jobs.find_one({"_id": job_id}, _BULKY)))

    async def find(
        self, where: JobFilter | None = None, limit: int = 50, after: str | None = None
    ) -> list[JobRecord]:
        """Records ``where`` selects, without bodies or history, newest first (by
        ``created_at``, then id); at most ``limit`` (capped at :data:`MAX_PAGE`).

        ``after`` is the id of the last record of the previous page: the page goes on from
        it, so jobs created while an operator pages through never shift a page (they come
        before the first one). Raises :class:`LookupError` when that record is gone.
        """
        where = where or JobFilter()
        limit = max(1, min(limit, MAX_PAGE))
        order = [("created_at", -1), ("_id", -1)]
        query = where.query()
        found: list[JobRecord] = []
        async with answering():
            if after is not None:
                last = await self.jobs.find_one({"_id": after}, {"created_at": 1})
                if last is None or "created_at" not in last:
                    raise LookupError(f"no job {after!r} to go on from")
                # Its twins first (created in the same millisecond), then older records; the
                # created_at equality leads, as the test server plans with a filter's first
                # indexed field.
                created, span = last["created_at"], query.pop("created_at", {})
                twins = {"created_at": {"$eq": created, **span}, **query, "_id": {"$lt": after}}
                cursor = self.jobs.find(twins, _BULKY).sort(order).limit(limit)
                found = [_record(doc) async for doc in cursor]
                query["created_at"] = {**span, "$lt": created}
            if len(found) < limit:
                cursor = self.jobs.find(query, _BULKY).sort(order).limit(limit - len(found))
                found += [_record(doc) async for doc in cursor]
        return found

    async def waiting_ids(
        self, domain: str, tag: str, skip: int, limit: int
    ) -> tuple[list[str], int]:
        """A page of the ids of ``domain``'s waiting jobs (scheduled, queued or retrying)
        tagged ``tag``, soonest due first, and how many there are.
        """
        query: Document = {"status": {"$in": list(WAITING)}, "domain": domain, "tags": tag}
        async with answering():
            total = await self.jobs.count_documents(query)
            cursor = self.jobs.find(query, {"_id": 1}).sort([("due_at", 1), ("_id", 1)])
            ids = [str(doc["_id"]) async for doc in cursor.skip(skip).limit(limit)]
        return ids, total

    async def sent_and_failed_since(self, domain: str, since: datetime) -> tuple[int, int]:
        """How many of ``domain``'s jobs were sent since ``since``, and how many failed an
        attempt since then (ended failed or dead, or wait for a retry after it); a job sent
        on its retry counts in both, as each send counted where the old daemon kept count.
        """
        recent: Document = {
            "status": {"$in": list(STATUSES)},  # the (status, updated_at) index serves it
            "updated_at": {"$gte": since},
            "domain": domain,
        }
        deferred = {"history": {"$elemMatch": {"event": "deferred", "at": {"$gte": since}}}}
        gave_up = {"status": {"$in": ["failed", "dead"]}}
        async with answering():
            sent = await self.jobs.count_documents({**recent, "status": "sent"})
            failed = await self.jobs.count_documents({**recent, "$or": [gave_up, deferred]})
        return sent, failed

    async def returned(self, ref: JobRef) -> JobRecord | None:
        """The record a return address names (by id, or by the search key of a long id),
        with what a bounce is checked against: domain, search keys (the recipients),
        tags, metadata, sandbox and the keys of the feedback recorded.
        """
        query: Document = {"_id": ref.job_id} if ref.job_id is not None else {"search": ref.key}
        fields = dict.fromkeys(("domain", "search", "tags", "metadata", "sandbox"), 1)
        async with answering():
            return _record(await self.jobs.find_one(query, {**fields, "feedback.key": 1}))

    async def add_feedback(self, job_id: str, entry: Document) -> bool:
        """Keep a bounce or complaint (``entry``, whose ``key`` names it) on the job's
        record, the latest :data:`FEEDBACK_LENGTH`; False when it was kept already.
        ``updated_at`` is left alone: listings by time speak of sending.
        """
        query = {"_id": job_id, "feedback.key": {"$ne": entry["key"]}}
        update = {"$push": {"feedback": {"$each": [entry], "$slice": -FEEDBACK_LENGTH}}}
        async with answering():
            result = await self.jobs.update_one(query, update)
        return result.modified_count == 1

    async def get(self, job_id: str) -> JobRecord | None:
        """The job's record, or None."""
        async with answering():
            return _record(await self.jobs.find_one({"_id": job_id}))

    async def finished_since(self, since: datetime) -> list[Document]:
        """How many jobs ended ``sent``, ``failed`` or ``dead`` since ``since``, counted by
        status, domain and outbox (``{"status", "domain", "outbox", "count"}`` each).
        """
        pipeline: list[Document] = [
            {
                "$match": {
                    "status": {"$in": ["sent", "failed", "dead"]},
                    "updated_at": {"$gte": since},
                }
            },
            {
                "$group": {
                    "_id": {"status": "$status", "domain": "$domain", "outbox": "$outbox"},
                    "count": {"$sum": 1},
                }
            },
        ]
        async with answering():
            cursor = await self.jobs.aggregate(pipeline)
            return [{**row["_id"], "count": row["count"]} async for row in cursor]

    async def last_errors(self, limit: int) -> list[Document]:
        """The most recent jobs that failed, died or wait for a retry, with their error."""
        query = {"status": {"$in": ["failed", "dead", "scheduled"]}, "last_error": {"$ne": None}}
        fields = ("status", "domain", "outbox", "reason", "last_error", "attempts", "updated_at")
        async with answering():
            cursor = self.jobs.find(query, dict.fromkeys(fields, 1))
            return [doc async for doc in cursor.sort("updated_at", -1).limit(limit)]
