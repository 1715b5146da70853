"""The SMTP connection pool against a real SMTP server: reuse, bounds, broken and idle links."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import aiosmtplib
import pytest

from consumer.core.content import Content
from consumer.core.message import Job
from consumer.core.mime import build_message, serialize
from consumer.core.outboxes import outbox_from_url
from consumer.mail.transport import PROBE_AFTER, SMTPPool
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import job

JOB = Job.model_validate(job())
MAIL = serialize(build_message(JOB, "pool-test", datetime.now(UTC), Content.of(JOB)), 10**6)


def pool_for(server: CaptureServer, size: int = 2, idle_seconds: float = 30.0) -> SMTPPool:
    """A pool to ``server`` with short timeouts."""
    return SMTPPool(outbox_from_url(server.url, timeout=5.0), size, idle_seconds)


@pytest.fixture
async def pool(smtp: CaptureServer) -> AsyncIterator[SMTPPool]:
    """A pool of two connections to the session's capture server."""
    connections = pool_for(smtp)
    yield connections
    await connections.close()


async def send(pool: SMTPPool, recipients: list[str] | None = None) -> None:
    """Send the test mail through ``pool``."""
    await pool.send(MAIL, "sender@example.com", recipients or ["rcpt@example.org"])


async def test_connections_are_reused_and_bounded(pool: SMTPPool, smtp: CaptureServer) -> None:
    await asyncio.gather(*(send(pool) for _ in range(10)))
    for _ in range(5):
        await send(pool)
    assert len(smtp.received()) == 15
    assert smtp.sessions == 2
    assert pool.opened == 2


async def test_a_connection_that_failed_is_never_reused(
    pool: SMTPPool, smtp: CaptureServer
) -> None:
    await send(pool)
    smtp.faults.drop_on_data = 1
    with pytest.raises(aiosmtplib.SMTPException):
        await send(pool)
    await send(pool)
    assert len(smtp.received()) == 2
    assert smtp.sessions == 2


async def test_refusals_leave_the_connection_usable(pool: SMTPPool, smtp: CaptureServer) -> None:
    smtp.faults.refuse_rcpt("gone@example.org", "550 5.1.1 user unknown")
    result = await pool.send(MAIL, "sender@example.com", ["rcpt@example.org", "gone@example.org"])
    assert result.refused == {"gone@example.org": (550, "5.1.1 user unknown")}
    smtp.faults.refuse_data("451 4.3.0 busy")
    with pytest.raises(aiosmtplib.SMTPDataError):
        await send(pool)
    await send(pool)
    assert len(smtp.received()) == 2


async def test_idle_connections_are_closed(smtp: CaptureServer) -> None:
    pool = pool_for(smtp, idle_seconds=0.2)
    try:
        await send(pool)
        await asyncio.sleep(0.6)
        assert smtp.quits == 1
        await send(pool)
        assert smtp.sessions == 2
    finally:
        await pool.close()
    assert smtp.quits == 2


@pytest.fixture
def impatient() -> Iterator[CaptureServer]:
    """A server that drops connections idle for half a second."""
    server = CaptureServer(idle_timeout=0.5)
    server.start()
    yield server
    server.stop()


async def test_connection_the_server_dropped_while_idle_is_replaced(
    impatient: CaptureServer,
) -> None:
    pool = pool_for(impatient)
    try:
        await send(pool)
        await asyncio.sleep(PROBE_AFTER + 0.5)
        await send(pool)
    finally:
        await pool.close()
    assert len(impatient.received()) == 2
    assert impatient.sessions == 2
