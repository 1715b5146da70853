"""Admin alerts: dead letters become one digest mail per interval, through the normal
pipeline, and a digest that dies itself is never reported.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from aio_pika.abc import AbstractChannel

from consumer.core.message import json_body, parse_job
from consumer.core.names import Names
from consumer.errors import ConfigurationError
from consumer.service.alerts import DIGEST_PREFIX, LISTED, check_addresses, digest_job
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import depth, publish_raw, until
from tests.conftest import RunningWorker

ADMIN = "ops@example.net"
INTERVAL = 3.0


@pytest.fixture
def alerting(settings: Settings) -> Settings:
    """The test's settings with admin alerts on, digests at most every few seconds."""
    return settings.model_copy(update={"admin_email": ADMIN, "admin_digest_seconds": INTERVAL})


async def test_a_storm_of_dead_letters_makes_one_digest(
    alerting: Settings, channel: AbstractChannel, smtp: CaptureServer, store: JobStore
) -> None:
    names = Names(alerting.prefix)
    workers = [RunningWorker(alerting), RunningWorker(alerting)]
    for i in range(20):
        await publish_raw(channel, names, b"{broken", message_id=f"bad-{i:02}")

    async with asyncio.timeout(30):
        [mail] = await smtp.wait_for(1)
    # Another interval passes: the twenty are reported, nothing more is sent.
    await asyncio.sleep(INTERVAL + 1)
    for running in workers:
        await running.shutdown()
    assert len(smtp.received()) == 1
    assert mail.rcpt_tos == (ADMIN,)
    message = mail.message()
    assert message["From"] == "mailbus <mailbus@example.net>"
    assert message["Subject"] == "mailbus: 20 dead letter(s)"
    text = message.get_content()
    assert text.startswith("20 dead letter(s) between ")
    for i in range(20):
        assert f"invalid  bad-{i:02}  -  body is not UTF-8 JSON" in text
    assert await depth(channel, names.dead) == 20
    [digest] = [d async for d in store.jobs.find({"_id": {"$regex": f"^{DIGEST_PREFIX}"}})]
    assert digest["status"] == "sent"
    alerts = [a async for a in store.database["alerts"].find({})]
    assert len(alerts) == 20
    assert {a["digest"] for a in alerts} == {digest["_id"]}


async def test_a_digest_that_dies_is_not_reported(
    alerting: Settings, channel: AbstractChannel, smtp: CaptureServer, store: JobStore
) -> None:
    names = Names(alerting.prefix)
    smtp.faults.refuse_rcpt(ADMIN, "550 5.7.1 no alerts here")
    running = RunningWorker(alerting)
    await publish_raw(channel, names, b"[]", message_id="bad")

    async def digest_died() -> bool:
        return await depth(channel, names.dead) == 2

    await until(digest_died, 30)
    await asyncio.sleep(INTERVAL + 1)
    await running.shutdown()
    assert smtp.received() == []
    assert await depth(channel, names.dead) == 2
    alerts = [a async for a in store.database["alerts"].find({})]
    assert [a["job_id"] for a in alerts] == ["bad"]
    digests = [d async for d in store.jobs.find({"_id": {"$regex": f"^{DIGEST_PREFIX}"}})]
    assert [(d["status"], d["reason"]) for d in digests] == [("failed", "permanent")]


def test_a_digest_counts_what_it_does_not_list() -> None:
    start = datetime(2030, 1, 1, tzinfo=UTC)
    alerts = [
        {"at": start + timedelta(seconds=i), "job_id": f"j{i}", "reason": "invalid", "error": "e"}
        for i in range(LISTED)
    ]
    job = digest_job(alerts, LISTED + 7, ADMIN, "alerts@example.net", start + timedelta(hours=1))
    parsed, job_id = parse_job(json_body(job), None)
    assert job_id == f"{DIGEST_PREFIX}20300101T010000.000000Z"
    assert parsed.domain == "example.net"
    assert parsed.text is not None
    assert "... and 7 more." in parsed.text
    assert parsed.text.count("  invalid  j") == LISTED


def test_unusable_admin_addresses_are_refused_at_start() -> None:
    with pytest.raises(ConfigurationError, match="MAILBUS_ADMIN_EMAIL"):
        check_addresses("not an address", "mailbus@example.net")
    with pytest.raises(ConfigurationError, match="MAILBUS_ADMIN_EMAIL"):
        check_addresses(ADMIN, "mailbus@example.net\r\nBcc: x@example.org")
