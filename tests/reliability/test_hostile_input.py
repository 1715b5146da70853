"""Hostile input the worker must refuse in bounded time and memory: compression bombs,
endless and dripping downloads, broken encodings, redirects to private addresses, bodies
over the broker's and mailbus's limits.
"""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import httpx
import pytest
from aio_pika.abc import AbstractChannel

from consumer.amqp import dead_letters
from consumer.amqp.publish import job_message
from consumer.core.names import Names
from consumer.core.refusals import AttachmentError
from consumer.errors import AttachmentUnavailableError
from consumer.mail import fetch
from consumer.mail.fetch import Fetcher, FetchLimits, Inflater
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from deploy.devstack.rabbitmq import MAX_MESSAGE_BYTES
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import depth, job
from tests.conftest import RunningWorker
from tests.http_files import FileServer, Route
from tests.reliability.accounts import Account, dead_ids, settle

CAP = 1024 * 1024
_URL = httpx.URL("http://files.example/a.pdf")


@pytest.fixture
async def fetcher(tmp_path: Path) -> AsyncIterator[Fetcher]:
    limits = FetchLimits(
        max_bytes=CAP, read_timeout=2.0, fetch_timeout=3.0, allow_private=True, tmp_dir=tmp_path
    )
    fetcher = Fetcher(limits)
    yield fetcher
    await fetcher.close()


def test_inflater_decodes_what_servers_send_in_bounded_pieces() -> None:
    data = bytes(range(256)) * 4000
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    encoded = {
        "gzip": gzip.compress(data),
        "deflate": zlib.compress(data),
        "identity": data,
        None: data,
    }
    for encoding, body in encoded.items():
        pieces = list(Inflater.for_encoding(_URL, encoding).feed(body))
        assert b"".join(pieces) == data, encoding
        if encoding not in ("identity", None):  # as is, a piece is what the network gave
            assert max(map(len, pieces)) <= 64 * 1024
    raw = raw_deflate.compress(data) + raw_deflate.flush()
    assert b"".join(Inflater.for_encoding(_URL, "deflate").feed(raw)) == data
    with pytest.raises(AttachmentError, match="content-encoding 'br' is not supported"):
        Inflater.for_encoding(_URL, "br")
    with pytest.raises(AttachmentError, match="corrupt"):
        list(Inflater.for_encoding(_URL, "gzip").feed(b"\x1f\x8b\x08\x00garbage" * 10))


@pytest.mark.parametrize(
    ("route", "refusal", "error"),
    [
        # 300 MiB of zeros in 300 KB: refused at the cap, never inflated whole.
        (
            Route(body=gzip.compress(b"\0" * (300 * CAP), 9), encoding="gzip"),
            "more than the limit",
            AttachmentError,
        ),
        # No length, far more than the cap: refused as soon as it passes it.
        (
            Route(body=b"x" * (40 * CAP), declare_length=False),
            "more than the limit",
            AttachmentError,
        ),
        # A byte every 50 ms never trips the read timeout; the whole fetch's deadline does.
        (Route(body=b"x" * 1000, drip=0.05), "not fetched within 3 s", AttachmentUnavailableError),
    ],
    ids=["gzip-bomb", "endless", "drip"],
)
async def test_download_bombs_are_refused_in_bounded_time_and_memory(
    files: FileServer,
    fetcher: Fetcher,
    tmp_path: Path,
    route: Route,
    refusal: str,
    error: type[Exception],
) -> None:
    url = files.route("/bomb", route)
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(error, match=refusal):
            await fetcher.fetch(url)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 5
    assert peak < 8 * CAP, f"{peak} bytes held to refuse it"
    assert not any(tmp_path.iterdir())  # noqa: ASYNC240  (the spool is gone)


async def test_bodies_over_the_broker_and_mailbus_limits(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    ledger: list[Account],
) -> None:
    """Over RabbitMQ's limit, the broker refuses the publish and nothing is queued; over
    mailbus's message limit, the job is a dead letter ``too_large``; next to them a
    normal job goes through.
    """
    names = Names(settings.prefix)
    exchange = await channel.get_exchange(names.exchange)
    huge = "x" * (MAX_MESSAGE_BYTES + 1024)
    async with await aio_pika.connect(settings.amqp_url.get_secret_value()) as connection:
        refused_channel = await connection.channel(publisher_confirms=True)
        refused_exchange = await refused_channel.get_exchange(names.exchange)
        message = job_message(job(subject="over-broker", text=huge), job_id="over-broker")
        with pytest.raises(aio_pika.exceptions.AMQPError):
            await refused_exchange.publish(message, routing_key="send")
    small = settings.model_copy(update={"max_message_bytes": CAP})
    over = job(subject="over-mailbus", text="y" * (CAP + 1024))
    await exchange.publish(job_message(over, job_id="over-mailbus"), routing_key="send")
    await exchange.publish(job_message(job(subject="fine"), job_id="fine"), routing_key="send")
    worker = RunningWorker(small)
    try:
        async with asyncio.timeout(60):
            await smtp.wait_for(1)
            dead: dict[str, str] = {}
            while "over-mailbus" not in dead:
                dead |= await dead_ids(channel, names)
                await asyncio.sleep(0.2)
    finally:
        await worker.shutdown()
    account = await settle(
        "oversize bodies", ["over-mailbus", "fine"], smtp.received(), dead, store
    )
    account.notes = {"refused_by_broker": 1}
    ledger.append(account)
    assert (account.sent, account.dead_reasons) == (1, {"too_large": 1})
    assert await store.get("over-broker") is None  # never reached a worker


# Where a redirect from a public-looking server may try to send the worker: each is
# refused at its own hop, before any connection is made to it (a host that does not
# exist is no more worth a retry).
REDIRECT_TARGETS = {
    "metadata": ("http://169.254.169.254/latest/meta-data/", "link-local address"),
    "loopback": ("http://127.0.0.2:8080/admin", "loopback address 127.0.0.2"),
    "private": ("http://10.1.2.3/internal", "private address 10.1.2.3"),
    "mapped": ("http://[::ffff:192.168.0.1]/", "private address ::ffff:c0a8:1"),
    "file": ("file:///etc/passwd", "scheme 'file'"),
    "6to4": ("http://[2002:a9fe:a9fe::1]/", "link-local address 2002:a9fe:a9fe::1"),
    "unknown": ("http://nowhere.invalid/a.pdf", "nowhere.invalid: no such host"),
}


@pytest.mark.timeout(60)
async def test_redirects_to_private_addresses_are_refused_at_their_hop(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    files: FileServer,
    store: JobStore,
    monkeypatch: pytest.MonkeyPatch,
    ledger: list[Account],
) -> None:
    # The test's file server stands in for a public one: only its own address counts as
    # public, so the first hop is fetched and every redirect is judged for real.
    judge = fetch.refused_address
    monkeypatch.setattr(
        fetch,
        "refused_address",
        lambda ip: None if ip == ipaddress.ip_address("127.0.0.1") else judge(ip),
    )
    names = Names(settings.prefix)
    exchange = await channel.get_exchange(names.exchange)
    for name, (target, _) in REDIRECT_TARGETS.items():
        files.route(f"/{name}", Route(status=302, location=target))
        body = job(subject=name, attachments=[{"url": files.url(f"/{name}")}])
        await exchange.publish(job_message(body, job_id=name), routing_key="send")
    running = RunningWorker(settings)
    try:
        async with asyncio.timeout(30):
            while await depth(channel, names.dead) < len(REDIRECT_TARGETS):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
    finally:
        await running.shutdown()
    queue = await channel.get_queue(names.dead, ensure=False)
    errors = {}
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        letter = dead_letters.read(message)
        assert letter.reason == "attachment"
        errors[letter.job_id] = letter.error
    for name, (_, refusal) in REDIRECT_TARGETS.items():
        assert refusal in str(errors[name]), errors[name]
    assert sorted(files.hits) == sorted(f"/{name}" for name in REDIRECT_TARGETS)
    dead = dict.fromkeys(errors, "attachment")
    account = await settle("redirects to private addresses", list(dead), [], dead, store)
    ledger.append(account)
    assert smtp.received() == []
    assert account.dead == len(REDIRECT_TARGETS)
