"""The job claim against a real MongoDB wire-protocol server: two workers never both send."""

from __future__ import annotations

import asyncio

from consumer.message import Job
from consumer.settings import Settings
from consumer.store import ClaimState, JobStore
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
