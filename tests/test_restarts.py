"""Stopping and restarting the worker and the broker loses nothing and sends nothing twice."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractChannel

from consumer.amqp.publish import job_message
from consumer.core.names import Names
from consumer.settings import Settings
from deploy.devstack.mongo import PrivateMongo
from deploy.devstack.processes import spawn_worker
from deploy.devstack.rabbitmq import PrivateRabbit
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import depth, job
from tests.conftest import RunningWorker


async def test_sigterm_mid_backlog_then_restart_delivers_all_exactly_once(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer, tmp_path: Path
) -> None:
    names = Names(settings.prefix)
    exchange = await channel.get_exchange(names.exchange)
    ids = [f"backlog-{i:03d}" for i in range(200)]
    for job_id in ids:
        await exchange.publish(job_message(job(subject=job_id), job_id=job_id), routing_key="send")
    smtp.faults.data_delay = 0.01  # a server slow enough that SIGTERM lands mid-backlog

    first = spawn_worker(settings, tmp_path / "worker1.log")
    async with asyncio.timeout(30):
        await smtp.wait_for(20)
    first.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(first.wait, 30) == 0
    stopped_at = len(smtp.received())
    assert stopped_at < 200, "the backlog was finished before SIGTERM: nothing was tested"
    assert b"worker.draining" in (tmp_path / "worker1.log").read_bytes()

    second = spawn_worker(settings, tmp_path / "worker2.log")
    try:
        async with asyncio.timeout(60):
            await smtp.wait_for(200)
        await asyncio.sleep(0.5)
    finally:
        second.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(second.wait, 30) == 0

    counts = Counter(m.message()["Subject"] for m in smtp.received())
    assert sorted(counts) == ids
    assert set(counts.values()) == {1}
    assert await depth(channel, names.send_queue) == 0
    assert await depth(channel, names.dead) == 0


async def test_worker_reconnects_after_broker_restart(
    settings: Settings, rabbit: PrivateRabbit, smtp: CaptureServer, worker: RunningWorker
) -> None:
    names = Names(settings.prefix)
    url = settings.amqp_url.get_secret_value()

    async def publish(subject: str) -> None:
        async with await aio_pika.connect(url) as connection:
            chan = await connection.channel(publisher_confirms=True)
            exchange = await chan.get_exchange(names.exchange)
            await exchange.publish(job_message(job(subject=subject)), routing_key="send")

    await publish("before")
    async with asyncio.timeout(20):
        await smtp.wait_for(1)

    await asyncio.to_thread(rabbit.stop)
    await asyncio.to_thread(rabbit.start)
    await publish("after")
    async with asyncio.timeout(60):
        await smtp.wait_for(2)
    assert [m.message()["Subject"] for m in smtp.received()] == ["before", "after"]
    assert not worker.task.done()


async def test_no_send_without_mongodb_and_recovery_after_it_returns(
    settings: Settings,
    channel: AbstractChannel,
    mongo: PrivateMongo,
    smtp: CaptureServer,
    worker: RunningWorker,
) -> None:
    names = Names(settings.prefix)
    exchange = await channel.get_exchange(names.exchange)
    await exchange.publish(job_message(job(subject="before")), routing_key="send")
    async with asyncio.timeout(20):
        await smtp.wait_for(1)

    await asyncio.to_thread(mongo.stop)
    await exchange.publish(job_message(job(subject="during")), routing_key="send")
    await asyncio.sleep(settings.store_timeout + 1)
    assert len(smtp.received()) == 1, "a mail went out without its claim in MongoDB"

    await asyncio.to_thread(mongo.start)
    async with asyncio.timeout(60):
        await smtp.wait_for(2)
    assert [m.message()["Subject"] for m in smtp.received()] == ["before", "during"]
    assert not worker.task.done()
