"""``mailbus dead``: listing, showing, replaying and purging real dead letters."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from consumer.amqp.dead_letters import parse_age
from consumer.amqp.publish import publish_job
from consumer.clock import utcnow
from consumer.core.headers import DEAD_AT_HEADER, REASON_HEADER
from consumer.core.names import Names
from consumer.core.schedule import to_epoch_ms
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from deploy.devstack.processes import mailbus
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import depth, encode, job, publish_raw, until
from tests.conftest import RunningWorker


async def _dead_letter(
    channel: AbstractChannel, names: Names, body: bytes, **headers: object
) -> None:
    """Put a message straight into the dead-letter exchange, as a worker or the broker would."""
    exchange = await channel.get_exchange(names.dead, ensure=False)
    message_id = json.loads(body)["id"]
    await exchange.publish(
        aio_pika.Message(body, headers=dict(headers), message_id=message_id), routing_key=""
    )


async def test_list_show_replay_once_and_purge(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    worker: RunningWorker,
    store: JobStore,
) -> None:
    names = Names(settings.prefix)
    smtp.faults.refuse_data("554 5.7.1 rejected for now")
    body = job(id="r1", domain_key="super-secret-domain-key", subject="Replay me")
    await publish_job(channel, body, names=names)
    await publish_raw(channel, names, b'{"domain": "example.com"}', message_id="bad-1")
    await until(lambda: _depth_is(channel, names.dead, 2), 20)

    listed = await mailbus(settings, "dead", "ls")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[2]: line.split() for line in listed.stdout.splitlines()[1:]}
    assert rows["r1"][1:4] == ["permanent", "r1", "example.com"]
    assert "554 5.7.1 rejected for now" in listed.stdout
    assert rows["bad-1"][1] == "invalid"
    only_invalid = await mailbus(settings, "dead", "ls", "--reason", "invalid")
    assert [line.split()[2] for line in only_invalid.stdout.splitlines()[1:]] == ["bad-1"]

    shown = await mailbus(settings, "dead", "show", "r1")
    assert "super-secret-domain-key" not in shown.stdout
    letter = json.loads(shown.stdout)
    assert letter["headers"]["x-mailbus-reason"] == "permanent"
    assert "domain_key" not in letter["body"]  # the key never reaches the dead letters
    assert letter["body"]["subject"] == "Replay me"
    assert await depth(channel, names.dead) == 2  # looking took nothing away

    # The operator fixed the cause (the fault was for one message): replay.
    replayed = await mailbus(settings, "dead", "replay", "r1")
    assert replayed.returncode == 0, replayed.stderr
    assert "r1: replayed (permanent)" in replayed.stdout
    async with asyncio.timeout(20):
        [mail] = await smtp.wait_for(1)
    assert mail.message()["Subject"] == "Replay me"
    await until(lambda: _status_is(store, "r1", "sent"), 10)
    record = await store.get("r1")
    assert record is not None
    assert record["attempts"] == 1  # attempts were reset
    assert [h["event"] for h in record["history"]][-3:] == ["replayed", "claimed", "sent"]

    again = await mailbus(settings, "dead", "replay", "r1")
    assert again.returncode == 1
    assert "no dead letter for job 'r1'" in again.stderr
    # A stale copy of a job that was sent meanwhile is never sent again.
    await _dead_letter(channel, names, encode(body), **{REASON_HEADER: "permanent"})
    stale = await mailbus(settings, "dead", "replay", "r1")
    assert "r1: sent, not replayed" in stale.stdout
    await asyncio.sleep(1)
    assert len(smtp.received()) == 1

    # Purge by age: one dead letter eight days old, one of yesterday.
    long_ago, yesterday = utcnow() - timedelta(days=8), utcnow() - timedelta(days=1)
    await _dead_letter(
        channel, names, encode(job(id="old")), **{DEAD_AT_HEADER: to_epoch_ms(long_ago)}
    )
    await _dead_letter(
        channel, names, encode(job(id="new")), **{DEAD_AT_HEADER: to_epoch_ms(yesterday)}
    )
    purged = await mailbus(settings, "dead", "purge", "--older-than", "7d")
    assert "1 dead letter(s) purged" in purged.stdout
    remaining = await mailbus(settings, "dead", "ls")
    ids = sorted(line.split()[2] for line in remaining.stdout.splitlines()[1:])
    assert ids == ["bad-1", "new", "r1"]
    everything = await mailbus(settings, "dead", "purge", "--all")
    assert "3 dead letter(s) purged" in everything.stdout
    assert await depth(channel, names.dead) == 0


async def test_broker_dead_letters_are_read_from_x_death(
    settings: Settings, channel: AbstractChannel
) -> None:
    names = Names(settings.prefix)
    death = {
        "reason": "delivery_limit",
        "queue": names.send_queue,
        "count": 1,
        "time": utcnow().replace(microsecond=0),
    }
    ladder = {**death, "reason": "expired", "queue": names.delay(3)}
    await _dead_letter(channel, names, encode(job(id="crashy")), **{"x-death": [ladder, death]})
    listed = await mailbus(settings, "dead", "ls")
    [row] = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert row[1:3] == ["delivery_limit", "crashy"]


def test_ages() -> None:
    assert parse_age("7d") == timedelta(days=7)
    assert parse_age("12h") == parse_age("12 hours") == timedelta(hours=12)
    assert parse_age("30min") == timedelta(minutes=30)
    assert parse_age("90s") == timedelta(seconds=90)
    with pytest.raises(ValueError, match="7d"):
        parse_age("a week")


async def _depth_is(channel: AbstractChannel, queue: str, count: int) -> bool:
    return await depth(channel, queue) == count


async def _status_is(store: JobStore, job_id: str, status: str) -> bool:
    record = await store.get(job_id)
    return record is not None and record["status"] == status
