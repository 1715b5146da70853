"""The job claim against a real MongoDB wire-protocol server: two workers never both send."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from consumer.clock import utcnow
from consumer.core.headers import RELEASED_AT_HEADER, RELEASED_BY_HEADER
from consumer.core.leases import Release, released
from consumer.core.message import Job
from consumer.core.schedule import CLAIM_AHEAD
from consumer.settings import Settings
from consumer.store.jobs import ClaimState, JobFilter, JobStore
from tests.broker import job


async def test_concurrent_claims_grant_exactly_one(store: JobStore) -> None:
    body = Job.model_validate(job())
    claims = await asyncio.gather(*(store.claim("j1", body, f"w{i}") for i in range(10)))
    states = [c.state for c in claims]
    assert states.count(ClaimState.CLAIMED) == 1
    assert states.count(ClaimState.LEASED) == 9


async def test_sent_job_is_never_claimed_again(store: JobStore) -> None:
    body = Job.model_validate(job())
    assert (await store.claim("j2", body, "w1")).state is ClaimState.CLAIMED
    assert await store.mark_sent("j2", "w1", {"code": 250, "message": "ok"}, {})
    again = await store.claim("j2", body, "w2")
    assert (again.state, again.status) == (ClaimState.DONE, "sent")


async def test_a_released_lease_is_taken_over_at_once(store: JobStore) -> None:
    """A delivery whose MongoDB failed mid-job lets go of the lease it may hold: its copy
    takes the lease over at once, whoever receives it; a release from another worker, or
    older than the holder's last move, does not.
    """
    body = Job.model_validate(job())
    assert (await store.claim("j5", body, "w1")).state is ClaimState.CLAIMED
    let_go = Release("w1", utcnow())
    assert (await store.claim("j5", body, "w2")).state is ClaimState.LEASED
    stale = Release("w1", let_go.at - timedelta(seconds=5))
    assert (await store.claim("j5", body, "w2", release=stale)).state is ClaimState.LEASED
    other = Release("w3", let_go.at)
    assert (await store.claim("j5", body, "w2", release=other)).state is ClaimState.LEASED
    taken = await store.claim("j5", body, "w2", release=let_go)
    assert (taken.state, taken.attempts) == (ClaimState.CLAIMED, 2)
    # The same release again finds w2's newer claim: it is not taken twice.
    assert (await store.claim("j5", body, "w1", release=let_go)).state is ClaimState.LEASED
    assert not await store.mark_sent("j5", "w1", {"code": 250}, {})
    assert await store.mark_sent("j5", "w2", {"code": 250}, {})


def test_a_release_travels_in_headers() -> None:
    at = datetime(2026, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
    assert released(Release("w1", at).headers()) == Release("w1", at)
    assert released({}) is None
    assert released({RELEASED_BY_HEADER: "w1", RELEASED_AT_HEADER: "soon"}) is None


async def test_expired_lease_can_be_claimed_and_old_holder_cannot_record(
    settings: Settings,
) -> None:
    short = JobStore.connect(settings.model_copy(update={"lease_seconds": 0.2}))
    body = Job.model_validate(job())
    try:
        assert (await short.claim("j3", body, "dead-worker")).state is ClaimState.CLAIMED
        assert (await short.claim("j3", body, "w2")).state is ClaimState.LEASED
        await asyncio.sleep(0.3)
        taken = await short.claim("j3", body, "w2")
        assert (taken.state, taken.attempts) == (ClaimState.CLAIMED, 2)
        assert not await short.mark_sent("j3", "dead-worker", {"code": 250}, {})
        assert await short.mark_sent("j3", "w2", {"code": 250}, {})
    finally:
        await short.close()


async def test_a_renewed_lease_is_not_taken_over(settings: Settings) -> None:
    """A worker that renews its lease keeps the job past the lease's first end; only the
    leases it still holds are renewed.
    """
    short = JobStore.connect(settings.model_copy(update={"lease_seconds": 0.3}))
    body = Job.model_validate(job())
    try:
        assert (await short.claim("r1", body, "w1")).state is ClaimState.CLAIMED
        assert (await short.claim("r2", body, "w2")).state is ClaimState.CLAIMED
        for _ in range(4):
            await asyncio.sleep(0.15)
            assert await short.renew({"r1", "r2", "unknown"}, "w1") == 1
        assert (await short.claim("r1", body, "w3")).state is ClaimState.LEASED
        assert (await short.claim("r2", body, "w3")).state is ClaimState.CLAIMED
        assert await short.renew(set(), "w1") == 0
    finally:
        await short.close()


async def test_claims_read_due_times_on_the_store_clock(settings: Settings) -> None:
    """A store whose clock is behind this machine's (a worker that measured MongoDB's
    clock ahead of its own) claims a job due by MongoDB's time, though not yet by its own.
    """
    ahead = timedelta(seconds=30)
    lagging = JobStore.connect(settings, clock=lambda: utcnow() + ahead)
    body = Job.model_validate(job())
    try:
        await lagging.schedule("c1", body, b"{}", utcnow() + ahead / 2)
        assert (await lagging.claim("c1", body, "w1")).state is ClaimState.CLAIMED
        record = await lagging.get("c1")
        assert record is not None
        # The lease, too, runs on the store's clock.
        assert record["lease_until"] > utcnow() + ahead
    finally:
        await lagging.close()


async def test_a_job_past_its_last_attempt_is_dead_at_its_claim(settings: Settings) -> None:
    """However a job comes back after its last attempt (here: a lease run out, as after
    a worker died mid-send), the claim records it dead with ``delivery_limit``.
    """
    short = JobStore.connect(settings.model_copy(update={"lease_seconds": 0.1, "max_attempts": 2}))
    body = Job.model_validate(job())
    try:
        for attempt in (1, 2):
            taken = await short.claim("x1", body, f"w{attempt}", recorded=attempt > 1)
            assert (taken.state, taken.attempts) == (ClaimState.CLAIMED, attempt)
            await asyncio.sleep(0.15)
        spent = await short.claim("x1", body, "w3", recorded=True)
        assert (spent.state, spent.attempts) == (ClaimState.EXHAUSTED, 2)
        record = await short.get("x1")
        assert record is not None
        assert (record["status"], record["reason"], record["attempts"]) == (
            "dead",
            "delivery_limit",
            2,
        )
        assert "lease_until" not in record
        again = await short.claim("x1", body, "w4", recorded=True)
        assert (again.state, again.status) == (ClaimState.DONE, "dead")
        # A job's own max_attempts bounds it the same way.
        once = Job.model_validate(job(max_attempts=1))
        assert (await short.claim("x2", once, "w1")).state is ClaimState.CLAIMED
        await asyncio.sleep(0.15)
        assert (await short.claim("x2", once, "w2")).state is ClaimState.EXHAUSTED
    finally:
        await short.close()


async def test_scheduled_job_is_claimable_only_from_its_due_time(store: JobStore) -> None:
    body = Job.model_validate(job())
    due = utcnow() + timedelta(seconds=0.5)
    first = await store.schedule("j4", body, b"{}", due)
    assert first.state is ClaimState.SCHEDULED
    duplicate = await store.schedule("j4", body, b"{}", due + timedelta(hours=1))
    assert duplicate.state is ClaimState.WAITING  # the first record wins
    assert duplicate.due_at is not None
    assert abs(duplicate.due_at - due) < timedelta(milliseconds=1)  # MongoDB keeps ms
    early = await store.claim("j4", body, "w1")
    assert early.state is ClaimState.WAITING
    assert early.due_at is not None
    assert abs(early.due_at - due) < timedelta(milliseconds=1)
    await asyncio.sleep(0.6)
    assert (await store.claim("j4", body, "w1")).state is ClaimState.CLAIMED


async def test_a_held_job_is_claimed_ahead_only_while_it_waits(store: JobStore) -> None:
    """A held job is claimed up to CLAIM_AHEAD before its time, and only from a waiting
    record: never one due later, never another worker's lease; once claimed, a cancel
    is refused, so a cancel that answered "cancelled" always holds.
    """
    body = Job.model_validate(job())
    await store.schedule("soon", body, b"{}", utcnow() + CLAIM_AHEAD / 2)
    await store.schedule("later", body, b"{}", utcnow() + CLAIM_AHEAD * 4)
    assert (await store.claim("soon", body, "w1", recorded=True)).state is ClaimState.WAITING
    ahead = await store.claim("later", body, "w1", recorded=True, ahead=True)
    assert ahead.state is ClaimState.WAITING
    taken = await store.claim("soon", body, "w1", recorded=True, ahead=True)
    assert (taken.state, taken.attempts) == (ClaimState.CLAIMED, 1)
    assert not (await store.cancel("soon")).applied
    # Another worker's lease, even one ending within CLAIM_AHEAD, is never taken ahead.
    assert (await store.claim("leased", body, "w1")).state is ClaimState.CLAIMED
    other = await store.claim("leased", body, "w2", recorded=True, ahead=True)
    assert other.state is ClaimState.LEASED


async def test_cancel_waiting_unknown_and_sent_jobs(store: JobStore) -> None:
    body = Job.model_validate(job())
    await store.schedule("waiting", body, b"{}", utcnow() + timedelta(hours=1))
    cancelled = await store.cancel("waiting")
    assert cancelled.applied
    assert cancelled.before is not None
    assert cancelled.before["status"] == "scheduled"

    tombstone = await store.cancel("unseen")
    assert (tombstone.applied, tombstone.before) == (True, None)
    assert (await store.claim("unseen", body, "w1")).status == "cancelled"

    await store.claim("done", body, "w1")
    await store.mark_sent("done", "w1", {"code": 250}, {})
    refused = await store.cancel("done")
    assert not refused.applied
    assert refused.before is not None
    assert refused.before["status"] == "sent"
    record = await store.get("done")
    assert record is not None
    assert record["status"] == "sent"


async def test_reschedule_moves_only_scheduled_jobs(store: JobStore) -> None:
    body = Job.model_validate(job())
    await store.schedule("later", body, b'{"k": 1}', utcnow() + timedelta(hours=1))
    sooner = utcnow() - timedelta(seconds=1)
    moved = await store.reschedule("later", sooner)
    assert moved.applied
    assert moved.before is not None
    assert moved.before["body"] == b'{"k": 1}'
    assert (await store.claim("later", body, "w1")).state is ClaimState.CLAIMED
    assert not (await store.reschedule("later", utcnow())).applied  # now sending
    unknown = await store.reschedule("nobody", utcnow())
    assert (unknown.applied, unknown.before) == (False, None)


async def test_new_jobs_are_claimed_and_recorded_in_batches(store: JobStore) -> None:
    body = Job.model_validate(job())
    ids = [f"batch-{i}" for i in range(20)]
    before = store.commands.counts()
    claims = await asyncio.gather(*(store.claim(i, body, "w1") for i in ids))
    assert all(c.state is ClaimState.CLAIMED for c in claims)
    # Another worker took one of them over (its lease had run out, say).
    await store.jobs.update_one({"_id": "batch-7"}, {"$set": {"worker": "w2"}})
    recorded = await asyncio.gather(
        *(store.mark_sent(i, "w1", {"code": 250, "message": "ok"}, {}) for i in ids)
    )
    assert recorded == [i != "batch-7" for i in ids]
    statuses = {doc["_id"]: doc["status"] async for doc in store.jobs.find({"_id": {"$in": ids}})}
    assert statuses == {i: "sending" if i == "batch-7" else "sent" for i in ids}
    after = store.commands.counts()
    # Claims made together are one insert; sends recorded together are one update (plus
    # the takeover above, and a find of which records the lost lease left unwritten).
    assert after["insert"] - before.get("insert", 0) == 1
    assert after["update"] - before.get("update", 0) == 2


async def test_a_record_the_server_refuses_fails_its_own_claim_only(store: JobStore) -> None:
    body = Job.model_validate(job())
    # A record MongoDB cannot store (a key with NUL), as a job built past validation
    # would make: the batch it went in is tried again record by record.
    unstorable = body.model_copy(update={"metadata": {"bad\0key": 1}})
    ids = [f"split-{i}" for i in range(6)]
    claims = await asyncio.gather(
        *(store.claim(i, unstorable if i == "split-3" else body, "w1") for i in ids),
        return_exceptions=True,
    )
    refused = {i for i, claim in zip(ids, claims, strict=True) if isinstance(claim, Exception)}
    assert refused == {"split-3"}
    assert all(c.state is ClaimState.CLAIMED for c in claims if not isinstance(c, Exception))
    stored = {doc["_id"] async for doc in store.jobs.find({"_id": {"$in": ids}})}
    assert stored == set(ids) - {"split-3"}


async def test_a_job_known_to_have_a_record_is_claimed_without_an_insert(
    store: JobStore,
) -> None:
    body = Job.model_validate(job())
    await store.schedule("known", body, b"{}", utcnow())
    before = store.commands.counts().get("insert", 0)
    claim = await store.claim("known", body, "w1", recorded=True)
    assert (claim.state, claim.attempts) == (ClaimState.CLAIMED, 1)
    assert store.commands.counts().get("insert", 0) == before
    # Its record was never written after all (MongoDB was down when it was scheduled):
    # the claim creates it.
    missing = await store.claim("never-recorded", body, "w1", recorded=True)
    assert missing.state is ClaimState.CLAIMED
    record = await store.get("never-recorded")
    assert record is not None
    assert (record["status"], record["worker"]) == ("sending", "w1")


async def test_records_carry_two_indexes_and_an_upgrade_drops_the_retired_ones(
    store: JobStore,
) -> None:
    """Each secondary index costs every write of every mail: the records keep the TTL,
    (status, updated_at), created_at and search, and the two an earlier version declared
    go at start-up.
    """
    await store.jobs.create_index([("status", 1), ("due_at", 1)])
    await store.jobs.create_index("updated_at")
    await store.ensure_indexes()
    indexes = await store.jobs.index_information()
    assert sorted(indexes) == [
        "_id_",
        "created_at_1",
        "expire_at_1",
        "search_1",
        "status_1_updated_at_-1",
    ]
    await store.ensure_indexes()  # idempotent
    assert sorted(await store.jobs.index_information()) == sorted(indexes)


async def test_listings_come_newest_first(store: JobStore) -> None:
    """Newest first across every status, or within the one asked for."""
    now = utcnow()
    for n, status in enumerate(["sent", "scheduled", "failed", "scheduled", "dead"]):
        await store.jobs.insert_one(
            {
                "_id": f"list-{n}",
                "status": status,
                "domain": "example.com",
                "created_at": now + timedelta(seconds=n),
                "updated_at": now + timedelta(seconds=n),
                "due_at": now + timedelta(minutes=10 - n),
            }
        )
    newest_first = [r["_id"] for r in await store.find()]
    assert newest_first == ["list-4", "list-3", "list-2", "list-1", "list-0"]
    scheduled = [r["_id"] for r in await store.find(JobFilter(status="scheduled"))]
    assert scheduled == ["list-3", "list-1"]


async def test_the_sent_write_pushes_no_history_and_the_record_still_tells_it(
    store: JobStore,
) -> None:
    """Every mail's last write only sets fields; the record read back (``jobs show``)
    ends its history with the send, its time and the server's reply.
    """
    body = Job.model_validate(job())
    assert (await store.claim("h1", body, "w1")).state is ClaimState.CLAIMED
    reply = {"code": 250, "message": "2.0.0 queued"}
    assert await store.mark_sent("h1", "w1", reply, {})
    stored = await store.jobs.find_one({"_id": "h1"})
    assert stored is not None
    assert [h["event"] for h in stored["history"]] == ["claimed"]
    record = await store.get("h1")
    assert record is not None
    assert [h["event"] for h in record["history"]] == ["claimed", "sent"]
    assert record["history"][-1] == {"at": record["sent_at"], "event": "sent", "smtp": reply}
