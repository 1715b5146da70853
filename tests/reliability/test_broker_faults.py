"""RabbitMQ killed with SIGKILL and stopped gracefully while two workers drain a backlog
and scheduled jobs wait in the delay ladder: workers reconnect, nothing is lost.

The scenario has a broker of its own: a node killed with SIGKILL replays its whole
write-ahead log at every later start, which would slow the session's broker for the
tests after it.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import aio_pika
import pytest
from pydantic import SecretStr

from consumer.amqp import topology
from consumer.amqp.publish import job_message
from consumer.core.names import Names
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from deploy.devstack.processes import spawn_worker, stop_workers
from deploy.devstack.rabbitmq import PrivateRabbit
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import job
from tests.reliability.accounts import Account, dead_ids, settle, subjects

NOW, LATER = 600, 40


async def publish(
    settings: Settings, bodies: dict[str, tuple[dict[str, object], int | None]]
) -> None:
    names = Names(settings.prefix)
    async with await aio_pika.connect(settings.amqp_url.get_secret_value()) as connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(names.exchange)
        for job_id, (body, delay_ms) in bodies.items():
            message = job_message(body, job_id=job_id, delay_ms=delay_ms)
            await exchange.publish(message, routing_key="send")


async def sent_at_least(smtp: CaptureServer, count: int) -> None:
    while len(smtp.received()) < count:  # noqa: ASYNC110
        await asyncio.sleep(0.05)


@pytest.mark.timeout(300)
async def test_broker_killed_and_restarted_mid_run(
    settings: Settings,
    own_rabbit: PrivateRabbit,
    smtp: CaptureServer,
    store: JobStore,
    tmp_path: Path,
    ledger: list[Account],
) -> None:
    rabbit = own_rabbit
    settings = settings.model_copy(update={"amqp_url": SecretStr(rabbit.amqp_url)})
    names = Names(settings.prefix)
    async with await aio_pika.connect(rabbit.amqp_url) as connection:
        await topology.declare(await connection.channel(), names, settings.delivery_limit)
    bodies: dict[str, tuple[dict[str, object], int | None]] = {
        f"broker-{i:04d}": (job(subject=f"broker-{i:04d}"), None) for i in range(NOW)
    }
    # Scheduled across the faults: they wait in the delay ladder while the broker dies.
    bodies |= {
        f"ladder-{i:02d}": (job(subject=f"ladder-{i:02d}"), 4000 + 200 * i) for i in range(LATER)
    }
    await publish(settings, bodies)
    smtp.faults.data_delay = 0.01  # slow enough that the faults land mid-run
    workers: list[subprocess.Popen[bytes]] = [
        spawn_worker(settings, tmp_path / f"worker{n}.log") for n in range(2)
    ]
    faults = []
    try:
        for threshold, kill in ((100, True), (350, False)):
            async with asyncio.timeout(60):
                await sent_at_least(smtp, threshold)
            faults.append(("SIGKILL" if kill else "stop", len(smtp.received())))
            await asyncio.to_thread(rabbit.stop, kill)
            await asyncio.sleep(1)
            await asyncio.to_thread(rabbit.start)
        async with asyncio.timeout(150):
            while len(subjects(smtp.received())) < len(bodies):  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        alive = [process.poll() is None for process in workers]
    finally:
        await stop_workers(*workers)

    async with await aio_pika.connect(settings.amqp_url.get_secret_value()) as connection:
        dead = await dead_ids(await connection.channel(), names)
    account = await settle(
        "RabbitMQ SIGKILL and restart", list(bodies), smtp.received(), dead, store
    )
    account.notes = {"faults_after_sent": faults}
    ledger.append(account)
    assert alive == [True, True], "a worker gave up instead of reconnecting"
    assert account.settled, account.missing[:10]
    assert (account.sent, account.dead, account.duplicated) == (len(bodies), 0, 0), account.twice
