"""Retention without a cron: job records expire through their TTL index, dead letters
through a per-message TTL, and a replayed copy does not inherit that TTL.
"""

from __future__ import annotations

from aio_pika.abc import AbstractChannel

from consumer.amqp.dead_letters import replay_copy
from consumer.amqp.publish import publish_job
from consumer.core.names import Names
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from deploy.devstack.mongo import PrivateMongo
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import depth, job, publish_raw, until
from tests.conftest import RunningWorker

SECOND = 1 / 86400  # in days


async def test_a_finished_job_record_expires(
    settings: Settings,
    mongo: PrivateMongo,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
) -> None:
    settings = settings.model_copy(update={"retention_days": 1 * SECOND})
    running = RunningWorker(settings)
    await publish_job(channel, job(id="short-lived"), names=Names(settings.prefix))
    await publish_job(channel, job(id="kept"), names=Names(settings.prefix), delay_ms=3_600_000)
    await smtp.wait_for(1)

    async def recorded() -> bool:
        sent, kept = await store.get("short-lived"), await store.get("kept")
        return (sent or {}).get("status") == "sent" and (kept or {}).get("status") == "scheduled"

    await until(recorded)
    await running.shutdown()
    record = await store.get("short-lived")
    assert record is not None
    assert (record["expire_at"] - record["sent_at"]).total_seconds() == 1

    async def swept() -> bool:
        mongo.prune_ttl()
        return await store.get("short-lived") is None

    await until(swept, 10)
    # A job still waiting has no expiry: only finished records are swept.
    waiting = await store.get("kept")
    assert waiting is not None
    assert waiting["status"] == "scheduled"
    assert "expire_at" not in waiting


async def test_dead_letters_expire_and_a_replayed_copy_does_not(
    settings: Settings, channel: AbstractChannel
) -> None:
    settings = settings.model_copy(update={"dead_letter_days": 5 * SECOND})
    names = Names(settings.prefix)
    running = RunningWorker(settings)
    await publish_raw(channel, names, b"not json", message_id="garbage")

    async def dead() -> bool:
        return await depth(channel, names.dead) == 1

    await until(dead)
    await running.shutdown()
    queue = await channel.get_queue(names.dead, ensure=False)
    letter = await queue.get(no_ack=False)
    assert letter.expiration is not None
    assert 0 < letter.expiration <= 5
    assert replay_copy(letter).expiration is None
    # Handed back (as `mailbus dead ls` does), it keeps its expiry.
    await letter.nack(requeue=True)
    await until(dead, 2)

    async def gone() -> bool:
        return await depth(channel, names.dead) == 0

    await until(gone, 10)
