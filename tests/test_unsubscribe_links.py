"""One-click unsubscribe end to end: a worker sends a job's link through the capture SMTP
server, the REST gateway serves it (a page on GET, the unsubscribe on POST), and the
next mail of that list to that recipient is held back while other mail goes out.
"""

from __future__ import annotations

import asyncio
import json
import smtplib
from collections.abc import AsyncIterator
from datetime import timedelta

import aiohttp
import pytest
from aio_pika.abc import AbstractChannel
from pydantic import SecretStr

from consumer.amqp.publish import publish_job
from consumer.clock import utcnow
from consumer.core.event_contract import EVENTS, MailUnsubscribed
from consumer.core.names import Names
from consumer.core.unsubscribe import Unsubscribe, make_token
from consumer.service.webhooks import check_sealed
from consumer.settings import Settings
from consumer.store.domains import DomainStore, hash_key
from consumer.store.jobs import JobStore
from consumer.store.suppressions import SuppressionStore
from consumer.vault import Vault, new_key
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import job, listen_events, until
from tests.conftest import RunningWorker, settled_record
from tests.secret_watch import watched
from tests.serving import ANY_PORT, gateways

BASE = "https://unsub.example"
ONE_CLICK = {"List-Unsubscribe": "One-Click"}
RECIPIENT = "reader@example.org"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The test's settings with the key that signs links and the gateway's public URL."""
    return settings.model_copy(
        update={"secret_key": SecretStr(watched(new_key())), "unsubscribe_url": BASE}
    )


@pytest.fixture
async def rest(settings: Settings, channel: AbstractChannel) -> AsyncIterator[str]:
    """The REST gateway's address on loopback (the test's topology declared and removed)."""
    async with gateways(settings, rest=ANY_PORT) as bound:
        yield f"http://127.0.0.1:{bound['rest']}"


def newsletter(job_id: str, list_name: str = "news", **fields: object) -> dict[str, object]:
    """A job of example.com to the reader, asking for a link to leave ``list_name``."""
    unsubscribe = {"list": list_name, "mailto": "unsub@example.com"}
    return job(id=job_id, to=[RECIPIENT], unsubscribe=unsubscribe, **fields)


async def test_a_link_in_the_mail_unsubscribes_from_its_list_only(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    worker: RunningWorker,
    rest: str,
) -> None:
    names = Names(settings.prefix)
    events = await listen_events(channel, names)
    await publish_job(channel, newsletter("news-1"), names=names)
    async with asyncio.timeout(20):
        [mail] = await smtp.wait_for(1)
    message = mail.message()
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    link, mailto = (part.strip() for part in str(message["List-Unsubscribe"]).split(","))
    assert mailto == "<mailto:unsub@example.com>"
    assert link.startswith(f"<{BASE}/unsubscribe/")
    path = link[len(BASE) + 1 : -1]
    suppressions = SuppressionStore(store.database)

    async with aiohttp.ClientSession(rest) as http:
        async with http.get(path) as page:  # what a link scanner does: nothing happens
            assert page.status == 200
            assert page.content_type == "text/html"
            assert 'method="post"' in await page.text()
            assert page.headers["Referrer-Policy"] == "no-referrer"
        assert await suppressions.find(address=RECIPIENT) == []
        for _ in range(2):  # the one-click POST, then the page's form: the same answer
            async with http.post(path, data=ONE_CLICK) as done:
                assert (done.status, await done.text()) == (200, "unsubscribed\n")

    [entry] = await suppressions.find(address=RECIPIENT)
    assert (entry["domain"], entry["list"], entry["source"]) == (
        "example.com",
        "news",
        "unsubscribe",
    )
    seen: list[MailUnsubscribed] = []
    queue = await channel.get_queue(events, ensure=False)

    async def announced() -> bool:
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            parsed = EVENTS.validate_python(json.loads(message.body))
            if isinstance(parsed, MailUnsubscribed):
                # Sealed as a worker's events are, so that webhooks deliver it.
                vault = Vault.from_settings(settings)
                check_sealed(message.headers or {}, message.message_id, message.body, vault)
                seen.append(parsed)
        return bool(seen)

    await until(announced, 10)
    # Two requests with the link, one announcement: asked again, the answer is the same
    # and nothing more is published.
    await asyncio.sleep(0.5)
    await announced()
    [said] = seen
    assert (said.domain, said.list, said.recipient, said.id) == (
        "example.com",
        "news",
        RECIPIENT,
        "news-1",
    )

    other = {"domain": "example.net", "from": {"email": "s@example.net"}}
    await publish_job(channel, newsletter("news-2"), names=names)
    await publish_job(channel, newsletter("offers-1", "offers"), names=names)
    await publish_job(channel, newsletter("net-news-1", **other), names=names)
    async with asyncio.timeout(20):
        delivered = await smtp.wait_for(3)
    held = await settled_record(store, "news-2")
    assert (held["status"], held["suppressed"]) == ("dead", [RECIPIENT])
    assert sorted(m.mail_from for m in delivered[1:]) == ["s@example.net", "sender@example.com"]
    assert len(smtp.received()) == 3


async def test_forged_altered_and_expired_links_are_refused(settings: Settings, rest: str) -> None:
    vault = Vault.from_settings(settings)
    good = Unsubscribe("example.com", "news", RECIPIENT, None, utcnow() + timedelta(days=1))
    token = make_token(good, vault)
    expired = make_token(Unsubscribe(**{**good.__dict__, "expires": utcnow()}), vault)
    foreign = make_token(good, Vault([new_key()]))
    altered = token[:5] + ("A" if token[5] != "A" else "B") + token[6:]
    async with aiohttp.ClientSession(rest) as http:
        for bad, why in (
            (foreign, "not an unsubscribe link"),
            (altered, "not an unsubscribe link"),
            (expired, "this unsubscribe link has expired"),
        ):
            for method in ("GET", "POST"):
                async with http.request(method, f"/unsubscribe/{bad}", data=ONE_CLICK) as refused:
                    assert (refused.status, await refused.text()) == (400, why + "\n")
        async with http.post(f"/unsubscribe/{token}", data="x" * 4096) as large:
            assert large.status == 413
        async with http.post(f"/unsubscribe/{token}", data=ONE_CLICK) as done:
            assert done.status == 200


async def test_mail_submitted_over_smtp_asks_for_its_link_by_steering_fields(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    worker: RunningWorker,
) -> None:
    """``X-Mailbus-Unsubscribe`` (and ``-Mailto``) on a submitted message: the raw mail
    arrives with the link added at the top and its own bytes as they were; the link
    unsubscribes the recipient from that list, and the next submission for it is held.
    """
    key = watched("dk-unsub-smtp-0042")
    await DomainStore(store.database).put("example.com", hash_key(key), [], True)
    body = b"From: <sender@example.com>\r\nTo: <reader@example.org>\r\nSubject: Hi\r\n\r\nHello\r\n"
    steering = b"X-Mailbus-Unsubscribe: news\r\nX-Mailbus-Unsubscribe-Mailto: unsub@example.com\r\n"
    plain = settings.model_copy(update={"gateway_smtp_loopback_plain_auth": True})

    def submit(port: int, job_id: str, fields: bytes) -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as session:
            session.login("example.com", key)
            session.mail("sender@example.com")
            session.rcpt(RECIPIENT)
            return session.data(f"X-Mailbus-Id: {job_id}\r\n".encode() + fields + body)

    async with gateways(plain, rest=ANY_PORT, smtp=ANY_PORT) as bound:
        accepted = await asyncio.to_thread(submit, bound["smtp"], "smtp-news-1", steering)
        assert accepted == (250, b"2.0.0 Queued as smtp-news-1")
        async with asyncio.timeout(20):
            [mail] = await smtp.wait_for(1)
        head, _, rest = mail.data.partition(b"\r\n <mailto:unsub@example.com>\r\n")
        assert head.startswith(f"List-Unsubscribe: <{BASE}/unsubscribe/".encode())
        assert rest.startswith(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")
        assert rest.endswith(body)
        assert b"X-Mailbus-" not in mail.data
        path = head.decode().split("<", 1)[1].rstrip(">,")[len(BASE) :]
        gateway = f"http://127.0.0.1:{bound['rest']}"
        async with (
            aiohttp.ClientSession(gateway) as http,
            http.post(path, data=ONE_CLICK) as done,
        ):
            assert done.status == 200
        [entry] = await SuppressionStore(store.database).find(address=RECIPIENT)
        assert (entry["domain"], entry["list"]) == ("example.com", "news")

        again = await asyncio.to_thread(submit, bound["smtp"], "smtp-news-2", steering)
        other = steering.replace(b": news", b": offers")
        offers = await asyncio.to_thread(submit, bound["smtp"], "smtp-offers-1", other)
        alone = await asyncio.to_thread(
            submit, bound["smtp"], "smtp-mailto", b"X-Mailbus-Unsubscribe-Mailto: u@example.com\r\n"
        )
    assert (again[0], offers[0], alone[0]) == (250, 250, 554)
    held = await settled_record(store, "smtp-news-2")
    assert (held["status"], held["suppressed"]) == ("dead", [RECIPIENT])
    sent = await settled_record(store, "smtp-offers-1")
    assert sent["status"] == "sent"
    assert len(smtp.received()) == 2
