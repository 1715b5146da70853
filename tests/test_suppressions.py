"""Suppressions by scope, on the real store, through the worker and the CLI."""

from __future__ import annotations

import asyncio

from aio_pika.abc import AbstractChannel

from consumer.amqp.publish import publish_job
from consumer.core.names import Names
from consumer.core.suppression import Scope
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from consumer.store.suppressions import SuppressionStore
from deploy.devstack.processes import mailbus
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import job
from tests.conftest import RunningWorker, settled_record

NEWS = Scope("example.com", "news")


async def test_each_job_is_held_to_global_its_domains_and_its_lists_entries(
    store: JobStore,
) -> None:
    suppressions = SuppressionStore(store.database)
    await suppressions.ensure_indexes()
    await suppressions.add("everyone@example.org", "operator")
    await suppressions.add("Domain@example.org", "complained", scope=Scope("Example.com"))
    await suppressions.add("list@example.org", "unsubscribed", scope=NEWS)
    asked = ["everyone@example.org", "domain@example.org", "LIST@example.org", "ok@example.org"]

    assert await suppressions.among(asked, domain="example.com", list_name="news") == {
        "everyone@example.org",
        "domain@example.org",
        "list@example.org",
    }
    assert await suppressions.among(asked, domain="example.com", list_name="offers") == {
        "everyone@example.org",
        "domain@example.org",
    }
    assert await suppressions.among(asked, domain="example.net") == {"everyone@example.org"}


async def test_automatic_entries_never_replace_an_operators_and_entries_from_before_scopes_hold(
    store: JobStore,
) -> None:
    suppressions = SuppressionStore(store.database)
    await suppressions.add("kept@example.org", "operator says", scope=Scope("example.com"))
    await suppressions.add_automatic(
        {"kept@example.org": "550 5.1.1", "new@example.org": "550 5.1.1"},
        scope=Scope("example.com"),
        source="bounce",
        days=30,
    )
    await suppressions.entries.insert_one(
        {"_id": "old@example.org", "source": "bounce", "reason": "x", "expire_at": None}
    )
    by_address = {
        d["address"]: d for d in await suppressions.find(domain="example.com") if "address" in d
    }
    assert by_address["kept@example.org"]["source"] == "manual"
    assert by_address["kept@example.org"]["expire_at"] is None
    assert by_address["new@example.org"]["source"] == "bounce"
    assert by_address["new@example.org"]["expire_at"] is not None
    assert await suppressions.among(["old@example.org"], domain="example.net") == {
        "old@example.org"
    }
    assert [d["_id"] for d in await suppressions.find(address="OLD@example.org")] == [
        "old@example.org"
    ]


async def test_a_bounce_never_shortens_a_complaint_kept_for_good(store: JobStore) -> None:
    suppressions = SuppressionStore(store.database)
    domain = Scope("example.com")
    for source, days in (("bounce", 30.0), ("complaint", None), ("bounce", 30.0)):
        await suppressions.add_automatic(
            {"c@example.org": source}, scope=domain, source=source, days=days
        )
    [entry] = await suppressions.find(address="c@example.org")
    assert (entry["source"], entry["expire_at"]) == ("complaint", None)


async def test_one_domains_suppression_never_blocks_another_domains_mail(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    worker: RunningWorker,
    store: JobStore,
) -> None:
    await SuppressionStore(store.database).add(
        "bob@example.org", "complained", scope=Scope("example.com")
    )
    names = Names(settings.prefix)
    to = ["bob@example.org", "cy@example.org"]
    await publish_job(channel, job(id="com", to=to), names=names)
    await publish_job(
        channel,
        job(id="net", to=to, domain="example.net", **{"from": {"email": "s@example.net"}}),
        names=names,
    )
    async with asyncio.timeout(20):
        mails = await smtp.wait_for(2)
    envelopes = sorted((m.mail_from, m.rcpt_tos) for m in mails)
    assert envelopes == [
        ("s@example.net", ("bob@example.org", "cy@example.org")),
        ("sender@example.com", ("cy@example.org",)),
    ]
    assert (await settled_record(store, "com"))["suppressed"] == ["bob@example.org"]


async def test_suppress_add_ls_rm_by_scope(settings: Settings, store: JobStore) -> None:
    added = await mailbus(
        settings,
        "suppress", "add", "a@example.org", "--domain", "example.com", "--list", "news",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "1 address(es) suppressed (example.com list news)" in added.stdout
    listed = await mailbus(settings, "suppress", "ls", "--domain", "example.com")
    assert "a@example.org  example.com list news  manual" in listed.stdout
    wrong = await mailbus(settings, "suppress", "rm", "a@example.org", "--domain", "example.com")
    assert wrong.returncode == 1
    assert "was not suppressed (example.com)" in wrong.stderr
    assert await SuppressionStore(store.database).among(
        ["a@example.org"], domain="example.com", list_name="news"
    ) == {"a@example.org"}
    bad = await mailbus(settings, "suppress", "add", "a@example.org", "--list", "news")
    assert bad.returncode != 0
    assert "a list belongs to a domain" in bad.stderr
