"""Events keep their documented contract: every body a worker publishes validates against
the shipped schema's models, and a subscriber written like the example sees them.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from aio_pika.abc import AbstractChannel
from pydantic import ValidationError

from consumer.amqp.publish import publish_job
from consumer.core.event_contract import EVENTS, MailDeferred, events_json_schema
from consumer.core.names import Names
from consumer.settings import Settings
from deploy.devstack.processes import settings_env
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import control, drain_events, job, listen_events, publish_raw, until
from tests.conftest import RunningWorker


def test_shipped_schema_matches_the_models(repo_root: Path) -> None:
    shipped = json.loads((repo_root / "consumer" / "schemas" / "events-v1.json").read_text())
    assert shipped == events_json_schema(), "run `make schema` and commit the result"


def test_the_contract_refuses_what_it_does_not_promise() -> None:
    with pytest.raises(ValidationError):
        EVENTS.validate_python({"event": "mail.sent", "id": "x", "attempts": 1})
    with pytest.raises(ValidationError):
        EVENTS.validate_python({"event": "mail.exploded", "id": "x"})
    deferred = {
        "event": "mail.deferred",
        "id": "x",
        "attempts": 1,
        "reason": "retry",
        "due_at": "2030-01-01T00:00:00+00:00",
    }
    assert isinstance(EVENTS.validate_python(deferred), MailDeferred)
    with pytest.raises(ValidationError):
        EVENTS.validate_python({**deferred, "password": "x"})


async def test_every_event_a_worker_publishes_keeps_the_contract(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer, worker: RunningWorker
) -> None:
    names = Names(settings.prefix)
    events = await listen_events(channel, names)
    smtp.faults.refuse_rcpt("flaky@example.org", "451 4.3.0 try later")
    smtp.faults.refuse_rcpt("nobody@example.org", "550 5.1.1 unknown")
    await publish_job(channel, job(id="plain", tags=["t"], metadata={"n": 1}), names=names)
    await publish_job(channel, job(id="flaky", to=["flaky@example.org"]), names=names)
    await publish_job(channel, job(id="refused", to=["nobody@example.org"]), names=names)
    await publish_raw(channel, names, b"{", message_id="garbage")
    await publish_job(channel, job(id="later"), names=names, delay_ms=3_600_000)
    seen: list[tuple[str, dict[str, object]]] = []

    async def scheduled() -> bool:
        seen.extend(await drain_events(channel, events))
        return any(body["event"] == "mail.scheduled" for _, body in seen)

    await until(scheduled, 20)
    moved = {"reschedule": "later", "send_at": "2099-01-01T00:00:00+00:00"}
    assert (await control(channel, names, moved))["status"] == "rescheduled"
    assert (await control(channel, names, {"cancel": "later"}))["status"] == "cancelled"
    wanted = {
        "mail.sent",
        "mail.deferred",
        "mail.failed",
        "mail.dead",
        "mail.scheduled",
        "mail.cancelled",
    }

    async def everything() -> bool:
        seen.extend(await drain_events(channel, events))
        return wanted <= {body["event"] for _, body in seen} and (
            sum(body["event"] == "mail.sent" for _, body in seen) == 2
        )

    await until(everything, 20)
    for key, body in seen:
        parsed = EVENTS.validate_python(body)
        assert parsed.event == key
    assert any(body.get("rescheduled") for _, body in seen)


async def test_the_example_subscriber_prints_events(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    worker: RunningWorker,
    repo_root: Path,
) -> None:
    names = Names(settings.prefix)
    subscriber = await asyncio.create_subprocess_exec(
        sys.executable,
        str(repo_root / "producer_examples" / "events_subscriber.py"),
        "--count",
        "1",
        env=settings_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert subscriber.stderr is not None
    async with asyncio.timeout(30):
        ready = await subscriber.stderr.readline()
    assert b"listening" in ready
    await publish_job(channel, job(id="watched"), names=names)
    async with asyncio.timeout(30):
        out, err = await subscriber.communicate()
    assert subscriber.returncode == 0, err
    key, _, body = out.decode().strip().partition(" ")
    assert key == "mail.sent"
    assert json.loads(body)["id"] == "watched"
