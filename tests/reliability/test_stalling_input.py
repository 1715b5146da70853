"""Deliveries shaped to break a worker's parsing of its own headers: seals that are not
ASCII or not numbers, release times no clock can hold, due and send times past any date.
More of them than a worker's prefetch, then good jobs: every one is settled (sent, with
the forged headers ignored, or dead-lettered once), none is left holding a prefetch slot,
and the good jobs behind them go out.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aio_pika.abc import AbstractChannel
from pydantic import SecretStr

from consumer.core.headers import (
    DUE_HEADER,
    RELEASED_AT_HEADER,
    RELEASED_BY_HEADER,
    SEAL_HEADER,
    USER_HEADER,
)
from consumer.core.names import Names
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from consumer.vault import new_key
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import encode, job, publish_raw
from tests.conftest import RunningWorker
from tests.reliability.accounts import Account, dead_ids, settle
from tests.secret_watch import watched

GOOD = 10
# Sent as ordinary jobs of an open domain: the headers vouch for nothing.
FORGED: dict[str, dict[str, Any]] = {
    "seal-not-ascii": {USER_HEADER: "app1", SEAL_HEADER: "99999999999999.é"},
    "seal-superscript": {USER_HEADER: "app1", SEAL_HEADER: "².ab"},
    "seal-huge-number": {USER_HEADER: "app1", SEAL_HEADER: "9" * 5000 + ".ab"},
    "release-past-dates": {
        USER_HEADER: "app1",
        SEAL_HEADER: "9999999999999." + "0" * 64,
        RELEASED_BY_HEADER: "w1",
        RELEASED_AT_HEADER: 2**62,
    },
}
# Dead-lettered invalid: no date holds them.
FAR: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "due-past-dates": ({DUE_HEADER: 10**17}, {}),
    "send-at-9999": ({}, {"send_at": "9999-12-20T00:00:00Z"}),
}


async def test_deliveries_that_break_header_parsing_never_stall_a_worker(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    ledger: list[Account],
) -> None:
    sealing = settings.model_copy(update={"secret_key": SecretStr(watched(new_key()))})
    names = Names(sealing.prefix)
    rounds = sealing.prefetch // (len(FORGED) + len(FAR)) + 1  # more than a prefetch of them
    forged = [f"{kind}-{n}" for n in range(rounds) for kind in FORGED]
    far = [f"{kind}-{n}" for n in range(rounds) for kind in FAR]
    good = [f"good-{n}" for n in range(GOOD)]
    for job_id in forged:
        headers = FORGED[job_id.rsplit("-", 1)[0]]
        await publish_raw(channel, names, encode(job(id=job_id, subject=job_id)), headers=headers)
    for job_id in far:
        headers, fields = FAR[job_id.rsplit("-", 1)[0]]
        body = encode(job(id=job_id, subject=job_id, **fields))
        await publish_raw(channel, names, body, headers=headers)
    for job_id in good:
        await publish_raw(channel, names, encode(job(id=job_id, subject=job_id)))
    worker = RunningWorker(sealing)
    try:
        async with asyncio.timeout(60):
            await smtp.wait_for(len(forged) + GOOD)
    finally:
        await worker.shutdown()
    dead = await dead_ids(channel, names)
    published = [*forged, *far, *good]
    account = await settle("headers that break parsing", published, smtp.received(), dead, store)
    account.notes = {"prefetch": sealing.prefetch, "forged": len(forged), "far": len(far)}
    ledger.append(account)
    assert (account.sent, account.dead, account.duplicated, account.missing) == (
        len(forged) + GOOD,
        len(far),
        0,
        [],
    )
    assert dead == dict.fromkeys(far, "invalid")
