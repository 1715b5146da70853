"""Sandbox mode: a sandboxed domain's mail, or a job marked ``"sandbox": true``, goes every
step production mail goes (authorized, rendered, recorded, announced) but reaches no real
recipient: it is not delivered, or only to the catch-all ``MAILBUS_SANDBOX_OUTBOX``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aio_pika.abc import AbstractChannel

from consumer.amqp.publish import publish_job
from consumer.cli.config_file import load
from consumer.clock import utcnow
from consumer.core.event_contract import EVENTS
from consumer.core.names import Names
from consumer.core.outboxes import outbox_from_url
from consumer.core.outcomes import Later, Sent
from consumer.core.ratelimit import Limit
from consumer.core.sandbox import NOT_DELIVERED
from consumer.errors import ConfigurationError
from consumer.service.picker import Choice
from consumer.settings import Settings
from consumer.store.domains import hash_key
from consumer.store.jobs import JobStore
from consumer.store.mongo import Mongo
from consumer.store.outboxes import outbox_document
from deploy.devstack.processes import mailbus
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import drain_events, encode, job, listen_events, take, until
from tests.conftest import RunningWorker, settled_record
from tests.doubles import AuthorizerDouble, PickerDouble, Rig, SenderDouble, offline_settings
from tests.secret_watch import watched

STAGING_KEY = watched("dk-staging-sandbox-7731")
STAGING = "staging.example"


def staged(**fields: Any) -> dict[str, Any]:
    """A job of the sandboxed domain, with its key unless ``fields`` say otherwise."""
    return job(
        **{"domain": STAGING, "domain_key": STAGING_KEY, "from": "app@staging.example"} | fields
    )


async def register_staging(settings: Settings) -> None:
    """Register the staging domain with a key, and turn its sandbox mode on as an operator
    would.
    """
    async with Mongo.connect(settings) as mongo:
        assert await mongo.domains.put(STAGING, hash_key(STAGING_KEY), [], replace=False)
    turned = await mailbus(settings, "domain", "sandbox", STAGING, "on")
    assert turned.returncode == 0, turned.stderr
    assert "sandbox mode" in turned.stdout


async def events_until(
    channel: AbstractChannel, queue: str, expected: int
) -> dict[str, tuple[str, dict[str, Any]]]:
    """The events of ``queue`` by job id, once ``expected`` jobs have one; each body keeps
    the contract.
    """
    seen: dict[str, tuple[str, dict[str, Any]]] = {}

    async def enough() -> bool:
        for key, body in await drain_events(channel, queue):
            EVENTS.validate_python(body)
            seen[body["id"]] = (key, body)
        return len(seen) >= expected

    await until(enough, 20)
    return seen


async def test_sandboxed_mail_is_recorded_and_announced_but_not_delivered(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    worker: RunningWorker,
) -> None:
    names = Names(settings.prefix)
    await register_staging(settings)
    events = await listen_events(channel, names)
    await publish_job(channel, staged(id="staged"), names=names)
    await publish_job(channel, job(id="flagged", sandbox=True), names=names)
    await publish_job(channel, job(id="normal"), names=names)

    seen = await events_until(channel, events, 3)
    for job_id in ("staged", "flagged"):
        key, body = seen[job_id]
        assert (key, body["sandbox"]) == ("mail.sent", True)
        assert body["smtp"] == {"code": NOT_DELIVERED.code, "message": NOT_DELIVERED.message}
        assert "outbox" not in body
        record = await settled_record(store, job_id)
        assert (record["status"], record.get("sandbox"), record.get("outbox")) == (
            "sent",
            True,
            None,
        )
    key, body = seen["normal"]
    assert key == "mail.sent"
    assert "sandbox" not in body
    assert "sandbox" not in await settled_record(store, "normal")
    # Only the normal job's mail reached an SMTP server.
    assert [m.rcpt_tos for m in smtp.received()] == [("rcpt@example.org",)]

    registry = worker.worker.metrics.registry
    no_outbox = {"outbox": "", "provider": ""}
    assert registry.get_sample_value("mailbus_jobs_sandboxed_total", no_outbox) == 2
    default = {"outbox": "default", "provider": ""}
    assert registry.get_sample_value("mailbus_jobs_sent_total", default) == 1

    shown = await mailbus(settings, "jobs", "show", "staged")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["sandbox"] is True
    domain = await mailbus(settings, "domain", "show", STAGING)
    assert json.loads(domain.stdout)["sandbox"] is True


async def test_invalid_sandboxed_jobs_are_dead_lettered_as_in_production(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    worker: RunningWorker,
) -> None:
    names = Names(settings.prefix)
    await register_staging(settings)
    events = await listen_events(channel, names)
    template = {"name": "nowhere"}
    await publish_job(
        channel, job(id="no-template", sandbox=True, text=None, template=template), names=names
    )
    await publish_job(channel, staged(id="wrong-key", domain_key="dk-not-it"), names=names)

    seen = await events_until(channel, events, 2)
    reasons = {}
    for message in await take(channel, names.dead, 2):
        reasons[message.message_id] = (message.headers or {}).get("x-mailbus-reason")
    assert reasons == {"no-template": "template", "wrong-key": "unauthorized"}
    for job_id, reason in reasons.items():
        key, body = seen[job_id]
        assert (key, body["reason"], body["sandbox"]) == ("mail.dead", reason, True)
    record = await settled_record(store, "no-template")
    assert (record["status"], record.get("reason"), record.get("sandbox")) == (
        "dead",
        "template",
        True,
    )
    assert await store.get("wrong-key") is None  # refused before anything is recorded
    assert smtp.received() == []


@pytest.fixture
def catcher() -> Iterator[CaptureServer]:
    """The catch-all SMTP server (a MailHog) the sandbox outbox sends to."""
    server = CaptureServer()
    server.start()
    yield server
    server.stop()


async def test_the_sandbox_outbox_gets_sandboxed_mail_and_no_provider_token_is_spent(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    catcher: CaptureServer,
    store: JobStore,
) -> None:
    sandboxing = settings.model_copy(update={"sandbox_outbox": "catch-all"})
    await register_staging(sandboxing)
    async with Mongo.connect(sandboxing) as mongo:
        # example.com sends through its own outbox, one mail an hour; the catch-all is
        # any outbox, here of a domain of its own.
        assert await mongo.providers.put("relay", [Limit(1, 3600)], 1)
        for name, url, domain, provider in (
            ("real", smtp.url, "example.com", "relay"),
            ("catch-all", catcher.url, "mailhog.example", None),
        ):
            outbox = outbox_from_url(url, name=name, timeout=3.0)
            doc = outbox_document(outbox, domain, provider, None, utcnow())
            assert await mongo.outboxes.put(doc, replace=False)
    names = Names(sandboxing.prefix)
    events = await listen_events(channel, names)
    await publish_job(channel, staged(id="staged", cc=["copy@example.org"]), names=names)
    await publish_job(channel, job(id="flagged", sandbox=True), names=names)
    running = RunningWorker(sandboxing)
    try:
        seen = await events_until(channel, events, 2)
        # The token the hour allows is still there for the domain's real mail.
        await publish_job(channel, job(id="normal-1"), names=names)
        await publish_job(channel, job(id="normal-2"), names=names)
        seen |= await events_until(channel, events, 2)
    finally:
        await running.shutdown()

    for job_id in ("staged", "flagged"):
        key, body = seen[job_id]
        assert (key, body["sandbox"], body["outbox"]) == ("mail.sent", True, "catch-all")
        record = await settled_record(store, job_id)
        assert (record.get("sandbox"), record.get("outbox")) == (True, "catch-all")
    # The envelope keeps the real recipients: a catch-all takes any, and shows them.
    assert sorted(m.rcpt_tos for m in catcher.received()) == [
        ("rcpt@example.org",),
        ("rcpt@example.org", "copy@example.org"),
    ]
    # One of the two takes the token, the other queues for the next: the limit holds.
    normal = sorted((seen[i][0], seen[i][1].get("reason")) for i in ("normal-1", "normal-2"))
    assert normal == [("mail.deferred", "rate_limited"), ("mail.sent", None)]
    assert not any("sandbox" in seen[i][1] for i in ("normal-1", "normal-2"))
    assert [m.rcpt_tos for m in smtp.received()] == [("rcpt@example.org",)]
    sandboxed = {"outbox": "catch-all", "provider": ""}
    metrics = running.worker.metrics.registry
    assert metrics.get_sample_value("mailbus_jobs_sandboxed_total", sandboxed) == 2


async def test_a_sandboxed_domain_hands_nothing_over_and_takes_no_outbox() -> None:
    sender = SenderDouble()
    picker = PickerDouble(Choice(sender))
    registration = {"_id": "example.com", "sandbox": True}
    rig = Rig(picker=picker, authorizer=AuthorizerDouble(registration=registration))
    outcome = await rig.process(encode(job()))
    assert isinstance(outcome, Sent)
    assert (outcome.ctx.sandbox, outcome.result) == (True, NOT_DELIVERED)
    assert sender.handed == []
    assert picker.chosen == []  # no outbox, no token taken
    assert rig.store.called("mark_sent")["details"] == {"sandbox": True}


async def test_a_missing_sandbox_outbox_is_retried_like_any_outbox_an_operator_can_fix() -> None:
    missing = ConfigurationError("MAILBUS_SANDBOX_OUTBOX names 'catch-all', which is not ...")
    picker = PickerDouble(sandbox_choice=missing)
    rig = Rig(settings=offline_settings(sandbox_outbox="catch-all"), picker=picker)
    outcome = await rig.process(encode(job(sandbox=True)))
    assert isinstance(outcome, Later)
    assert outcome.why == "retry"
    assert picker.asked_sandbox == ["catch-all"]
    assert picker.chosen == []


async def test_the_catch_all_refusing_an_address_suppresses_nobody() -> None:
    unknown = aiosmtplib.SMTPRecipientsRefused(
        [aiosmtplib.SMTPRecipientRefused(550, "5.1.1 no such user", "a@example.org")]
    )
    catch_all = SenderDouble(
        outbox_from_url("smtp://127.0.0.1:1025", name="catch-all"), replies=[unknown]
    )
    rig = Rig(
        settings=offline_settings(sandbox_outbox="catch-all"),
        picker=PickerDouble(sandbox_choice=Choice(catch_all)),
    )
    outcome = await rig.process(encode(job(to=["a@example.org"], sandbox=True)))
    assert outcome.ctx.outbox == "catch-all"
    assert [h.recipients for h in catch_all.handed] == [["a@example.org"]]
    assert rig.suppressions.added == []  # the real address is none of its business


async def test_the_config_file_carries_a_domains_sandbox_mode(
    settings: Settings, tmp_path: Path
) -> None:
    entry = f'[domains."{STAGING}"]\nkey_hash = "{hash_key(STAGING_KEY)}"\n'
    source = tmp_path / "mailbus.toml"
    source.write_text(entry + "sandbox = true\n")
    imported = await mailbus(settings, "config", "import", str(source))
    assert imported.stdout.splitlines() == [f"domain {STAGING}: created"], imported.stderr
    exported = await mailbus(settings, "config", "export")
    assert load(exported.stdout).domains[STAGING].sandbox is True

    source.write_text(entry)  # the key as it is, the mode off
    turned_off = await mailbus(settings, "config", "import", str(source))
    assert turned_off.stdout.splitlines() == [f"domain {STAGING}: updated"], turned_off.stderr
    async with Mongo.connect(settings) as mongo:
        stored = await mongo.domains.get(STAGING)
    assert stored is not None
    assert stored["sandbox"] is False
