"""One bad record never fails its batch: jobs whose record MongoDB could not store (a NUL
in a metadata key, metadata past its bound, too many tags) arrive in the same prefetch as
good ones, whose records are written in one batched insert. Only the bad ones end as dead
letters, once each; every good one is sent once.
"""

from __future__ import annotations

import asyncio

from aio_pika.abc import AbstractChannel

from consumer.core.names import Names
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import encode, job, publish_raw
from tests.conftest import RunningWorker
from tests.reliability.accounts import Account, dead_ids, settle

GOOD = 30
POISON = {
    "nul-key": {"metadata": {"order": {"id\u0000": 1}}},
    "huge-metadata": {"metadata": {"blob": "x" * 17 * 1024}},
    "many-tags": {"tags": [f"tag-{i}" for i in range(60)]},
}


async def test_a_bad_record_fails_only_its_own_job(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    ledger: list[Account],
) -> None:
    names = Names(settings.prefix)
    good = [f"good-{i}" for i in range(GOOD)]
    # Poison in the middle of the backlog, so it shares a prefetch (and a batch) with good jobs.
    published = [*good[: GOOD // 2], *POISON, *good[GOOD // 2 :]]
    for job_id in published:
        body = job(id=job_id, subject=job_id, **POISON.get(job_id, {}))
        await publish_raw(channel, names, encode(body))
    worker = RunningWorker(settings)
    try:
        async with asyncio.timeout(30):
            await smtp.wait_for(GOOD)
    finally:
        await worker.shutdown()
    dead = await dead_ids(channel, names)
    account = await settle("bad records among good ones", published, smtp.received(), dead, store)
    ledger.append(account)
    assert (account.sent, account.dead, account.duplicated, account.missing) == (GOOD, 3, 0, [])
    assert dead == dict.fromkeys(POISON, "invalid")
