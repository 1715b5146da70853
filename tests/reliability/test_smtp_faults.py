"""An SMTP server that misbehaves in every way it can: the account still balances."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest
from aio_pika.abc import AbstractChannel
from pydantic import SecretStr

from consumer.amqp.publish import job_message
from consumer.core.names import Names
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import job
from tests.conftest import RunningWorker
from tests.reliability.accounts import Account, dead_ids, deliveries, settle

PLAIN, MIXED = 200, 20
PERMANENT = 5


async def publish_all(
    channel: AbstractChannel, names: Names, bodies: dict[str, dict[str, object]]
) -> None:
    exchange = await channel.get_exchange(names.exchange)
    for job_id, body in bodies.items():
        await exchange.publish(job_message(body, job_id=job_id), routing_key="send")


async def test_an_unhappy_smtp_server(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    worker: RunningWorker,
    ledger: list[Account],
) -> None:
    """421 and 451 on DATA, dropped connections, silence after DATA (the client's timeout
    fires), slow replies, 554 on DATA, and recipients answered 250/451/550 in one mail:
    every mail reaches each recipient that accepts it exactly once, 554s are dead letters
    with a reason, nothing is lost.
    """
    names = Names(settings.prefix)
    faults = smtp.faults
    faults.refuse_data(*["421 4.3.2 shutting down"] * 10, *["451 4.3.0 busy"] * 10)
    faults.refuse_data(*["554 5.7.1 rejected by policy"] * PERMANENT)
    faults.drop_on_data = 10
    faults.hang_on_data = 3
    faults.hang_seconds = settings.smtp_timeout + 1
    faults.data_delay = 0.02
    faults.refuse_rcpt("soft@example.org", *["451 4.2.1 mailbox busy"] * MIXED)
    faults.refuse_rcpt("hard@example.org", *["550 5.1.1 no such user"] * MIXED)
    bodies: dict[str, dict[str, object]] = {
        f"smtp-{i:03d}": job(subject=f"smtp-{i:03d}") for i in range(PLAIN)
    }
    mixed = {
        f"mixed-{i:02d}": job(
            subject=f"mixed-{i:02d}",
            to=["ok@example.org", "soft@example.org", "hard@example.org"],
        )
        for i in range(MIXED)
    }
    bodies.update(mixed)
    await publish_all(channel, names, bodies)

    dead: dict[str, str] = {}
    async with asyncio.timeout(90):
        while True:
            dead.update(await dead_ids(channel, names))
            account = await settle(
                "unhappy SMTP server", list(bodies), smtp.received(), dead, store
            )
            # Every job here ends sent or dead: a retry still waiting (a mail whose DATA
            # hung waits out the timeout first) is waited for too.
            if account.settled and not account.scheduled and not await _still_owed(store, mixed):
                break
            await asyncio.sleep(0.5)
    ledger.append(account)
    assert (account.dead, account.dead_reasons) == (PERMANENT, {"permanent": PERMANENT})
    assert account.sent == len(bodies) - PERMANENT
    assert account.duplicated == 0, account.twice
    arrived = deliveries(smtp.received())
    for job_id in mixed:
        if job_id in dead:
            continue
        # Accepted at once, accepted on a retry, refused for good: once, once, never.
        assert [arrived[job_id, rcpt + "@example.org"] for rcpt in ("ok", "soft", "hard")] == [
            1,
            1,
            0,
        ]


async def _still_owed(store: JobStore, jobs: dict[str, dict[str, object]]) -> bool:
    """True while a mixed job still waits to retry a recipient that answered 451."""
    for job_id in jobs:
        record = await store.get(job_id)
        if record is None or record.get("status") not in ("sent", "failed"):
            return True
    return False


@pytest.fixture
def closed_smtp() -> Iterator[CaptureServer]:
    """An SMTP server whose port refuses connections until the test starts it."""
    server = CaptureServer()
    yield server
    with contextlib.suppress(AssertionError):  # aiosmtpd's way of saying it never started
        server.stop()


async def test_a_server_refusing_connections_then_coming_back(
    settings: Settings,
    channel: AbstractChannel,
    closed_smtp: CaptureServer,
    store: JobStore,
    ledger: list[Account],
) -> None:
    """Connection refused is transient: the jobs wait their retries and all go out once
    the server listens, exactly once each.
    """
    settings = settings.model_copy(update={"default_smtp_url": SecretStr(closed_smtp.url)})
    names = Names(settings.prefix)
    bodies = {f"refused-{i:02d}": job(subject=f"refused-{i:02d}") for i in range(50)}
    worker = RunningWorker(settings)
    try:
        await publish_all(channel, names, bodies)
        await asyncio.sleep(1.5)
        assert closed_smtp.received() == []
        closed_smtp.start()
        async with asyncio.timeout(60):
            await closed_smtp.wait_for(len(bodies))
        await asyncio.sleep(1)  # time for a second copy of anything, were there one
    finally:
        await worker.shutdown()
    account = await settle(
        "SMTP server refusing connections", list(bodies), closed_smtp.received(),
        await dead_ids(channel, names), store,
    )  # fmt: skip
    ledger.append(account)
    assert (account.sent, account.dead, account.duplicated) == (len(bodies), 0, 0)
