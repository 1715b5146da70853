"""The MongoDB server stopped mid-run, and commands failed on purpose with its fail
points, while two workers drain a backlog: no mail goes out without its claim, and
every job is sent once when the server is back.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from aio_pika.abc import AbstractChannel
from pydantic import SecretStr
from pymongo import MongoClient

from consumer.amqp.publish import job_message
from consumer.core.names import Names
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from deploy.devstack.mongo import PrivateMongo
from deploy.devstack.processes import spawn_worker, stop_workers
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import job
from tests.reliability.accounts import Account, dead_ids, settle, subjects

JOBS = 600


@pytest.fixture
def durable_mongo(tmp_path: Path) -> Iterator[PrivateMongo]:
    """A server of the test's own that keeps its data across a restart, as MongoDB does."""
    server = PrivateMongo(tmp_path / "mongo", storage=tmp_path / "mongo-data")
    server.start()
    yield server
    server.stop()


def fail_commands(url: str, commands: list[str], times: int, **how: object) -> None:
    """Make the server fail the next ``times`` of ``commands`` (``configureFailPoint``)."""
    with MongoClient(url) as client:
        client.admin.command(
            {
                "configureFailPoint": "failCommand",
                "mode": {"times": times},
                "data": {"failCommands": commands, **how},
            }
        )


@pytest.mark.timeout(300)
async def test_store_stopped_and_failing_mid_run(
    settings: Settings,
    channel: AbstractChannel,
    durable_mongo: PrivateMongo,
    smtp: CaptureServer,
    tmp_path: Path,
    ledger: list[Account],
) -> None:
    settings = settings.model_copy(update={"mongo_url": SecretStr(durable_mongo.url)})
    names = Names(settings.prefix)
    exchange = await channel.get_exchange(names.exchange)
    ids = [f"store-{i:04d}" for i in range(JOBS)]
    for job_id in ids:
        await exchange.publish(job_message(job(subject=job_id), job_id=job_id), routing_key="send")
    smtp.faults.data_delay = 0.01
    workers: list[subprocess.Popen[bytes]] = [
        spawn_worker(settings, tmp_path / f"worker{n}.log") for n in range(2)
    ]
    notes: dict[str, object] = {}
    try:
        async with asyncio.timeout(60):
            while len(smtp.received()) < 120:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await asyncio.to_thread(durable_mongo.stop)
        stopped_at = len(smtp.received())
        await asyncio.sleep(settings.store_timeout + 2)
        during = len(smtp.received()) - stopped_at
        notes["sent_while_down"] = during
        await asyncio.to_thread(durable_mongo.start)

        async with asyncio.timeout(60):
            while len(smtp.received()) < 350:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        # Writes and reads fail on purpose: errors, then dropped connections.
        await asyncio.to_thread(
            fail_commands, durable_mongo.url, ["insert", "update", "find"], 20, errorCode=91
        )
        await asyncio.to_thread(
            fail_commands, durable_mongo.url, ["update", "findAndModify"], 10, closeConnection=True
        )
        async with asyncio.timeout(150):
            while len(subjects(smtp.received())) < JOBS:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        alive = [process.poll() is None for process in workers]
    finally:
        await stop_workers(*workers)

    async with JobStore.connect(settings) as store:
        account = await settle(
            "MongoDB stopped, restarted and failing commands",
            ids, smtp.received(), await dead_ids(channel, names), store,
        )  # fmt: skip
        records = [await store.get(job_id) for job_id in ids]
    account.notes = notes
    ledger.append(account)
    assert alive == [True, True]
    # Only jobs claimed before the server went can be sent while it is down: at most
    # what the two workers held.
    assert during <= 2 * settings.prefetch
    assert account.settled, account.missing[:10]
    assert (account.sent, account.dead, account.duplicated) == (JOBS, 0, 0), account.twice
    assert {r["status"] for r in records if r} == {"sent"}
