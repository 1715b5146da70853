"""Bad input and permanent failures end in the dead-letter queue with a reason; nothing loops."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aio_pika.abc import AbstractChannel

from consumer.amqp.publish import publish_job
from consumer.core.names import Names
from consumer.errors import StoreUnavailableError
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import depth, encode, job, publish_raw, take
from tests.conftest import RunningWorker, settled_record
from tests.secret_watch import watched

LEAKED_KEY = watched("dk-s3cret-0042")

INVALID = [
    pytest.param(b'{"domain": "example.com", "to": [', "body is not UTF-8 JSON", id="malformed"),
    pytest.param(
        encode({k: v for k, v in job().items() if k != "to"}),
        "a job needs from and to",
        id="missing-to",
    ),
    pytest.param(
        encode(job(priority="high")), "priority: Extra inputs are not permitted", id="unknown-field"
    ),
    pytest.param(
        encode(job(subject="Hi\r\nBcc: victim@example.net")),
        "subject: Value error, line breaks",
        id="crlf-subject",
    ),
    pytest.param(
        encode(job(to=["Evil\r\nBcc: victim@example.net <a@example.org>"])),
        "line breaks",
        id="crlf-display-name",
    ),
    pytest.param(
        encode(job(headers={"X-Ok": "a\nBcc: victim@example.net"})),
        "line breaks",
        id="crlf-custom-header",
    ),
    pytest.param(encode(job(to=["not-an-address"])), "invalid email address", id="bad-address"),
    pytest.param(b"\xff\xfe not utf-8", "body is not UTF-8 JSON", id="not-utf8"),
]


@pytest.mark.parametrize(("body", "error"), INVALID)
async def test_invalid_job_is_dead_lettered_and_worker_keeps_going(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    worker: RunningWorker,
    body: bytes,
    error: str,
) -> None:
    names = Names(settings.prefix)
    await publish_raw(channel, names, body, message_id="bad-1")
    await publish_job(channel, job(subject="after the bad one"), names=names)

    async with asyncio.timeout(20):
        [dead] = await take(channel, names.dead, 1)
        [mail] = await smtp.wait_for(1)
    assert dead.headers["x-mailbus-reason"] == "invalid"
    assert error in str(dead.headers["x-mailbus-error"])
    assert dead.body == body  # the original bytes, for inspection and replay
    assert dead.message_id == "bad-1"
    assert mail.message()["Subject"] == "after the bad one"
    assert not worker.task.done()
    assert b"victim@example.net" not in b"".join(m.data for m in smtp.received())


async def test_550_is_dead_lettered_at_once_as_permanent(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer, worker: RunningWorker
) -> None:
    smtp.faults.refuse_rcpt("gone@example.org", "550 5.1.1 <gone@example.org>: user unknown")
    names = Names(settings.prefix)
    job_id = await publish_job(channel, job(to=["gone@example.org"]), names=names)

    async with asyncio.timeout(20):
        [dead] = await take(channel, names.dead, 1)
    assert dead.headers["x-mailbus-reason"] == "permanent"
    assert dead.headers["x-mailbus-smtp-code"] == 550
    assert dead.headers["x-mailbus-attempts"] == 1
    assert "user unknown" in str(dead.headers["x-mailbus-error"])
    assert smtp.received() == []
    store = JobStore.connect(settings)
    record = await store.get(job_id)
    await store.close()
    assert record is not None
    assert (record["status"], record["reason"], record["attempts"]) == ("failed", "permanent", 1)


async def test_451_is_retried_then_delivered(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer, worker: RunningWorker
) -> None:
    smtp.faults.refuse_data("451 4.3.0 try again later", "451 4.3.0 still busy")
    job_id = await publish_job(
        channel, job(subject="third time lucky"), names=Names(settings.prefix)
    )

    async with asyncio.timeout(20):
        [mail] = await smtp.wait_for(1)
    assert mail.message()["Subject"] == "third time lucky"
    store = JobStore.connect(settings)
    record = await settled_record(store, job_id)
    await store.close()
    assert (record["status"], record["attempts"]) == ("sent", 3)
    deferrals = [h for h in record["history"] if h["event"] == "deferred"]
    assert [d["error"] for d in deferrals] == ["451 4.3.0 try again later", "451 4.3.0 still busy"]


async def test_always_451_exhausts_attempts(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer, worker: RunningWorker
) -> None:
    smtp.faults.refuse_data(*["451 4.3.0 busy"] * 10)
    names = Names(settings.prefix)
    await publish_job(channel, job(max_attempts=3), names=names)

    async with asyncio.timeout(20):
        [dead] = await take(channel, names.dead, 1)
    assert dead.headers["x-mailbus-reason"] == "attempts_exhausted"
    assert dead.headers["x-mailbus-attempts"] == 3
    assert smtp.received() == []
    assert len(smtp.faults.data) == 7  # exactly three DATA attempts were made


async def test_expired_job_is_not_sent(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer, worker: RunningWorker
) -> None:
    names = Names(settings.prefix)
    await publish_job(channel, job(expires_at="2020-01-01T00:00:00Z"), names=names)
    async with asyncio.timeout(20):
        [dead] = await take(channel, names.dead, 1)
    assert dead.headers["x-mailbus-reason"] == "expired"
    assert smtp.received() == []


async def test_events_announce_sent_and_failed(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer, worker: RunningWorker
) -> None:
    names = Names(settings.prefix)
    events = await channel.declare_queue(exclusive=True)
    await events.bind(names.events, routing_key="mail.#")
    smtp.faults.refuse_rcpt("gone@example.org", "550 no such user")
    sent_id = await publish_job(
        channel,
        job(tags=["welcome"], metadata={"user": 7}, domain_key=LEAKED_KEY),
        names=names,
    )
    failed_id = await publish_job(channel, job(to=["gone@example.org"]), names=names)

    async with asyncio.timeout(20):
        received = await take(channel, events.name, 2)
    bodies = {m.routing_key: json.loads(m.body) for m in received}
    assert bodies["mail.sent"]["id"] == sent_id
    assert bodies["mail.sent"]["tags"] == ["welcome"]
    assert bodies["mail.sent"]["metadata"] == {"user": 7}
    assert bodies["mail.sent"]["smtp"]["code"] == 250
    assert bodies["mail.failed"]["id"] == failed_id
    assert bodies["mail.failed"]["reason"] == "permanent"
    assert LEAKED_KEY not in json.dumps(bodies)


async def test_partly_refused_mail_counts_as_sent_to_the_accepted_recipients(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    worker: RunningWorker,
    store: JobStore,
) -> None:
    smtp.faults.refuse_rcpt("gone@example.org", "550 5.1.1 <gone@example.org>: user unknown")
    names = Names(settings.prefix)
    job_id = await publish_job(
        channel,
        job(to=["rcpt@example.org", "gone@example.org"], cc=["cc@example.org"]),
        names=names,
    )
    async with asyncio.timeout(20):
        [mail] = await smtp.wait_for(1)
    await asyncio.sleep(0.5)  # a retry, if any were made, would show by now
    assert len(smtp.received()) == 1
    assert sorted(mail.rcpt_tos) == ["cc@example.org", "rcpt@example.org"]
    record = await store.get(job_id)
    assert record is not None
    assert (record["status"], record["attempts"]) == ("sent", 1)
    assert record["refused"] == {
        "gone@example.org": {"code": 550, "message": "5.1.1 <gone@example.org>: user unknown"}
    }
    assert await depth(channel, names.dead) == 0


async def test_recipient_deferred_with_4xx_alone_gets_the_retry(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    worker: RunningWorker,
    store: JobStore,
) -> None:
    smtp.faults.refuse_rcpt("busy@example.org", "451 4.2.1 mailbox busy, try later")
    smtp.faults.refuse_rcpt("gone@example.org", "550 5.1.1 user unknown")
    names = Names(settings.prefix)
    mixed = job(to=["rcpt@example.org", "busy@example.org", "gone@example.org"])
    job_id = await publish_job(channel, mixed, names=names)

    async with asyncio.timeout(20):
        first, second = await smtp.wait_for(2)
    await asyncio.sleep(0.5)
    assert len(smtp.received()) == 2
    assert first.rcpt_tos == ("rcpt@example.org",)
    assert second.rcpt_tos == ("busy@example.org",)  # never again to the accepted one
    assert first.message()["Message-ID"] == second.message()["Message-ID"]
    record = await store.get(job_id)
    assert record is not None
    assert (record["status"], record["attempts"]) == ("sent", 2)
    assert record["refused"] == {"gone@example.org": {"code": 550, "message": "5.1.1 user unknown"}}
    [deferral] = [h for h in record["history"] if h["event"] == "deferred"]
    assert deferral["error"] == "451 <busy@example.org> 4.2.1 mailbox busy, try later"


async def test_a_partial_delivery_is_recorded_through_a_store_outage(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    worker: RunningWorker,
    store: JobStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MongoDB fails just as the worker records which recipients took the mail and which
    deferred it: the record is written once MongoDB answers, never given up on, so the
    retry goes to the deferred recipient alone.
    """
    mark_retry = JobStore.mark_retry
    outages: list[str] = []

    async def failing_once(self: JobStore, job_id: str, *args: Any, **kwargs: Any) -> Any:
        if not outages:
            outages.append(job_id)
            raise StoreUnavailableError("MongoDB unavailable: injected")
        return await mark_retry(self, job_id, *args, **kwargs)

    monkeypatch.setattr(JobStore, "mark_retry", failing_once)
    smtp.faults.refuse_rcpt("busy@example.org", "451 4.2.1 mailbox busy, try later")
    names = Names(settings.prefix)
    job_id = await publish_job(
        channel, job(to=["rcpt@example.org", "busy@example.org"]), names=names
    )

    async with asyncio.timeout(20):
        first, second = await smtp.wait_for(2)
    await asyncio.sleep(1)
    assert outages == [job_id]
    assert [m.rcpt_tos for m in smtp.received()] == [("rcpt@example.org",), ("busy@example.org",)]
    assert first.message()["Message-ID"] == second.message()["Message-ID"]
    record = await store.get(job_id)
    assert record is not None
    assert (record["status"], record["attempts"]) == ("sent", 2)
