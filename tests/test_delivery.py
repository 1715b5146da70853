"""Publish a job, see the mail arrive: the spine, against the real broker, store and SMTP."""

from __future__ import annotations

import asyncio
import email.utils
from datetime import UTC, datetime, timedelta

from aio_pika.abc import AbstractChannel

from consumer.amqp.publish import publish_job
from consumer.core.mime import message_id_for
from consumer.core.names import Names
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import job, publish_raw
from tests.conftest import RunningWorker, settled_record


async def test_published_job_is_delivered_with_correct_headers_and_parts(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer, worker: RunningWorker
) -> None:
    body = job(
        **{"from": {"email": "news@example.com", "name": "Ünïcode Nëws"}},
        to=["Zoë Ågren <zoe@example.org>", {"email": "bob@example.net"}],
        cc=["carol@example.org"],
        bcc=["hidden@example.org"],
        reply_to="help@example.com",
        subject="Grüße — 你好 ✉",
        text="Plain: naïve café, 日本語\nsecond line",
        html="<p>HTML: naïve café, <b>日本語</b></p>",
        headers={"X-Campaign": "spring", "List-Unsubscribe": "<mailto:u@example.com>"},
    )
    before = datetime.now(UTC) - timedelta(seconds=1)
    job_id = await publish_job(channel, body, names=Names(settings.prefix))

    async with asyncio.timeout(20):
        [mail] = await smtp.wait_for(1)
    msg = mail.message()

    assert mail.mail_from == "news@example.com"
    assert sorted(mail.rcpt_tos) == sorted(
        ["zoe@example.org", "bob@example.net", "carol@example.org", "hidden@example.org"]
    )
    assert msg["From"].addresses[0].display_name == "Ünïcode Nëws"
    assert msg["From"].addresses[0].addr_spec == "news@example.com"
    assert [a.addr_spec for a in msg["To"].addresses] == ["zoe@example.org", "bob@example.net"]
    assert msg["To"].addresses[0].display_name == "Zoë Ågren"
    assert msg["Cc"].addresses[0].addr_spec == "carol@example.org"
    assert msg["Bcc"] is None
    assert b"hidden@example.org" not in mail.data
    assert msg["Reply-To"].addresses[0].addr_spec == "help@example.com"
    assert msg["Subject"] == "Grüße — 你好 ✉"
    assert msg["Message-ID"] == message_id_for(job_id, "example.com")
    sent_date = email.utils.parsedate_to_datetime(msg["Date"])
    assert before <= sent_date <= datetime.now(UTC) + timedelta(seconds=1)
    assert msg["X-Campaign"] == "spring"
    assert msg["List-Unsubscribe"] == "<mailto:u@example.com>"
    assert msg.get_content_type() == "multipart/alternative"
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert text is not None
    assert html is not None
    assert text.get_content() == "Plain: naïve café, 日本語\nsecond line\n"
    assert html.get_content() == "<p>HTML: naïve café, <b>日本語</b></p>\n"
    assert all(line.isascii() for line in mail.data.splitlines())  # 7-bit on the wire

    store = JobStore.connect(settings)
    record = await settled_record(store, job_id)
    await store.close()
    assert record["status"] == "sent"
    assert record["attempts"] == 1
    assert record["smtp"]["code"] == 250


async def test_any_amqp_client_can_publish_the_documented_json(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer, worker: RunningWorker
) -> None:
    raw = (
        b'{"id": "order-42-confirmation", "domain": "shop.example", '
        b'"from": "Shop <shop@shop.example>", "to": ["buyer@example.org"], '
        b'"subject": "Order 42", "html": "<h1>Thanks</h1>"}'
    )
    await publish_raw(channel, Names(settings.prefix), raw)

    async with asyncio.timeout(20):
        [mail] = await smtp.wait_for(1)
    msg = mail.message()
    assert msg["Subject"] == "Order 42"
    assert msg.get_content_type() == "text/html"
    assert msg.get_content() == "<h1>Thanks</h1>\n"
    assert msg["Message-ID"] == message_id_for("order-42-confirmation", "shop.example")


async def test_send_now_queue_is_served(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer, worker: RunningWorker
) -> None:
    await publish_job(
        channel, job(subject="urgent"), names=Names(settings.prefix), routing_key="send.now"
    )
    async with asyncio.timeout(20):
        [mail] = await smtp.wait_for(1)
    assert mail.message()["Subject"] == "urgent"


async def test_same_message_id_twice_is_delivered_once(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer, worker: RunningWorker
) -> None:
    names = Names(settings.prefix)
    await publish_job(channel, job(subject="once"), names=names, job_id="dup-1")
    async with asyncio.timeout(20):
        await smtp.wait_for(1)
    await publish_job(channel, job(subject="once"), names=names, job_id="dup-1")
    # Both copies published before the first is processed must also yield one mail.
    await publish_job(channel, job(subject="twice"), names=names, job_id="dup-2")
    await publish_job(channel, job(subject="twice"), names=names, job_id="dup-2")
    marker = await publish_job(channel, job(subject="marker"), names=names)
    async with asyncio.timeout(20):
        await smtp.wait_for(3)
    await asyncio.sleep(0.5)  # give any wrongful duplicate time to arrive

    subjects = sorted(m.message()["Subject"] for m in smtp.received())
    assert subjects == ["marker", "once", "twice"]
    store = JobStore.connect(settings)
    for job_id in ("dup-1", "dup-2", marker):
        record = await store.get(job_id)
        assert record is not None
        assert record["status"] == "sent"
    await store.close()


async def test_worker_reuses_a_bounded_number_of_smtp_connections(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer
) -> None:
    names = Names(settings.prefix)
    for i in range(20):
        await publish_job(channel, job(subject=f"pooled {i}"), names=names)
    running = RunningWorker(settings.model_copy(update={"smtp_pool_size": 2}))
    try:
        async with asyncio.timeout(30):
            await smtp.wait_for(20)
    finally:
        await running.shutdown()
    assert smtp.sessions <= 2
    assert smtp.quits == smtp.sessions  # a stopping worker closes its connections politely
