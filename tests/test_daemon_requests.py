"""The old daemon's every request against the daemon gateway, as its clients sent them (one
JSON value a connection, no newline), with a worker, the real broker, the test database
and the capture SMTP server behind it: the answers' exact words, the mail that arrives,
and the job and template records each request changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aio_pika.abc import AbstractChannel
from pydantic import SecretStr

from consumer.core.names import Names
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from consumer.store.templates import TemplateStore
from deploy.devstack.ports import free_port
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import encode, job, publish_raw, take
from tests.conftest import RunningWorker
from tests.serving import ANY_PORT, gateways

DOMAIN = "daemon.test"  # a special-use name, as the old suites and staging setups use
# The pattern the old clients (and the old suites) match queue identifiers with.
QUEUE_FILE = re.compile(r"^mail_([0-9]+)\.([0-9]+)_([a-z0-9]+)\.json")
TEMPLATE_HTML = "<!doctype html><html><body><h1>Hello {{ NAME }}</h1></body></html>"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """An open daemon gateway (no password, as the old MAILER_AUTH = false) for a domain
    at a special-use name.
    """
    return settings.model_copy(
        update={
            "gateway_password_hash": None,
            "gateway_domain": DOMAIN,
            "gateway_from": f"Test System <user@{DOMAIN}>",
            "gateway_wait_seconds": 10.0,
            "allow_special_use_domains": True,
        }
    )


@contextlib.asynccontextmanager
async def daemon_gateway(settings: Settings) -> AsyncIterator[int]:
    """The daemon gateway serving on a free loopback port; its port."""
    async with gateways(settings, daemon=ANY_PORT) as ports:
        yield ports["daemon"]


@pytest.fixture
async def port(settings: Settings, worker: RunningWorker) -> AsyncIterator[int]:
    """The open daemon gateway with a worker behind it."""
    async with daemon_gateway(settings) as bound:
        yield bound


async def ask(port: int, request: Any) -> Any:
    """One request as the old PHP clients sent it: JSON with no newline, then the answer
    read until the gateway closes the connection.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(json.dumps(request).encode())
        await writer.drain()
        async with asyncio.timeout(20):
            return json.loads(await reader.read())
    finally:
        writer.close()


def answer(status: str, data: Any, message: Any) -> dict[str, Any]:
    return {"status": status, "data": data, "message": message}


async def test_any_json_value_is_answered_with_the_old_words(port: int) -> None:
    assert await ask(port, None) == answer("error", None, "payload cannot be empty")
    assert await ask(port, []) == answer("error", None, "payload cannot be empty")
    assert await ask(port, "") == answer("error", None, "payload cannot be empty")
    assert await ask(port, {"auth": "abc12345"}) == answer("error", None, "invalid request")
    assert await ask(port, {"getQueue": None}) == answer("error", None, "invalid request")
    assert await ask(port, {"sendMail": ""}) == answer(
        "error", {"payload": ["The data (null) must match the type: object"]}, "invalid payload"
    )
    assert await ask(port, {"ping": ""}) == answer("success", None, "pong")
    # A password sent to an open gateway is ignored beside a request.
    assert await ask(port, {"ping": None, "auth": "x"}) == answer("success", None, "pong")
    for schedule in (10**20, -1, "tomorrow"):
        late = {"to": ["a@example.org"], "body": "b", "scheduleTime": schedule}
        refused = await ask(port, {"queueMail": late})
        assert (refused["status"], refused["message"]) == ("error", "invalid payload")
        assert "scheduleTime" in refused["data"]["payload"][0]
    assert await ask(port, {"getQueueList": {"limit": 500, "page": 10**30}}) == answer(
        "success", {"items": [], "total": 0}, "found 0 mails in queue"
    )
    missing = await ask(port, {"sendMail": {"subject": "s", "body": "b"}})
    assert (missing["status"], missing["message"]) == ("error", "invalid payload")
    assert "to" in missing["data"]["payload"][0]


async def test_templates_are_the_domains_stored_templates(
    settings: Settings, smtp: CaptureServer, store: JobStore, port: int
) -> None:
    templates = TemplateStore(store.database)
    # Another application's template: the gateway's clients neither see nor remove it.
    await templates.put("shared.html", "Shared", None, "<p>shared</p>")

    added = {"addTemplate": "welcome.html", "content": "<p>first</p>"}
    assert await ask(port, added) == answer("success", "welcome.html", "template added")
    again = await ask(port, added)
    assert (again["status"], again["message"]) == ("error", "unable to add template")
    taken = await ask(port, {"addTemplate": "shared.html", "content": "<p>mine</p>"})
    assert (taken["status"], taken["message"]) == ("error", "unable to add template")
    changed = {"updateTemplate": "welcome.html", "content": TEMPLATE_HTML}
    assert await ask(port, changed) == answer("success", "welcome.html", "template updated")
    assert await ask(port, {"getTemplate": "welcome.html"}) == answer(
        "success", TEMPLATE_HTML, "template found"
    )
    for name in ("shared.html", "missing.html", "../etc/passwd", 5):
        assert await ask(port, {"getTemplate": name}) == answer(
            "error", None, "unable to get template"
        )
    other = {"updateTemplate": "shared.html", "content": "<p>x</p>"}
    assert await ask(port, other) == answer("error", None, "unable to update template")
    await ask(port, {"addTemplate": "receipt.html", "content": "<p>receipt</p>"})
    assert await ask(port, {"getTemplateList": None}) == answer(
        "success", {"items": ["receipt.html", "welcome.html"], "total": 2}, "found 2 templates"
    )
    assert await ask(port, {"getTemplateList": {"limit": 1, "page": 1}}) == answer(
        "success", {"items": ["welcome.html"], "total": 2}, "found 2 templates"
    )

    mail = {
        "to": ["reader@example.org"],
        "ccList": [],
        "bccList": [],
        "subject": "Welcome",
        "useTemplate": "welcome.html",
        "replaceContent": {"NAME": "Ada"},
    }
    sent = await ask(port, {"sendMail": mail})
    assert sent == answer("success", None, "mail sent successfully")
    [received] = smtp.received()
    body = received.message().get_body(("html",))
    assert body is not None
    assert "<h1>Hello Ada</h1>" in body.get_content()

    assert await ask(port, {"removeTemplate": "receipt.html"}) == answer(
        "success", "receipt.html", "template removed"
    )
    assert await ask(port, {"removeTemplate": "shared.html"}) == answer(
        "error", None, "unable to remove template"
    )
    assert await ask(port, {"clearTemplate": None}) == answer(
        "success", {"removed": 1}, "removed 1 templates"
    )
    assert [doc["_id"] for doc in await templates.find()] == ["shared.html"]


async def test_the_queue_is_the_domains_waiting_jobs(
    settings: Settings, smtp: CaptureServer, store: JobStore, port: int
) -> None:
    later = int(time.time()) + 3600
    mails = [
        {
            "scheduleTime": later + offset,
            "to": [f"user{offset}@example.org"],
            "ccList": [],
            "bccList": [["hidden@example.org", "Hidden"]],
            "attachments": [],
            "embedded": [],
            "subject": f"Scheduled {offset}",
            "body": "<html>This is content</html>",
        }
        for offset in (20, 10)
    ]
    ids = []
    for mail in mails:
        queued = await ask(port, {"queueMail": mail})
        assert (queued["status"], queued["message"]) == ("success", "mail added to queue")
        assert QUEUE_FILE.match(queued["data"]), queued
        ids.append(queued["data"])
    soonest, latest = ids[1], ids[0]
    assert await ask(port, {"getQueueList": None}) == answer(
        "success", {"items": [soonest, latest], "total": 2}, "found 2 mails in queue"
    )
    assert await ask(port, {"getQueueList": {"limit": 1, "page": 1}}) == answer(
        "success", {"items": [latest], "total": 2}, "found 2 mails in queue"
    )
    assert await ask(port, {"getQueuedMail": latest}) == answer(
        "success", {**mails[0], "failToDelivered": 0}, latest
    )
    assert await ask(port, {"getQueuedMail": "mail_0_x.json"}) == answer(
        "error", None, "queued mail not found"
    )

    # Only the time changes: the same job moves.
    moved = await ask(port, {"updateQueuedMail": latest, "content": {"scheduleTime": later + 99}})
    assert moved == answer(
        "success",
        {**mails[0], "scheduleTime": later + 99, "failToDelivered": 0},
        {"original": latest, "updated": latest},
    )
    record = await store.get(latest)
    assert record is not None
    assert record["due_at"].timestamp() == later + 99

    # New content, due now: a new job replaces the old one, which is cancelled.
    content = {"subject": "New subject", "scheduleTime": int(time.time())}
    updated = await ask(port, {"updateQueuedMail": soonest, "content": content})
    assert updated["status"] == "success", updated
    assert updated["data"] == {**mails[1], **content, "failToDelivered": 0}
    assert updated["message"]["original"] == soonest
    replacement = updated["message"]["updated"]
    assert QUEUE_FILE.match(replacement)
    assert replacement != soonest
    old = await store.get(soonest)
    assert old is not None
    assert old["status"] == "cancelled"
    async with asyncio.timeout(30):
        [received] = await smtp.wait_for(1)
    assert received.message()["Subject"] == "New subject"
    assert sorted(received.rcpt_tos) == ["hidden@example.org", "user10@example.org"]
    assert "Bcc" not in received.message()

    assert await ask(port, {"removeQueuedMail": latest}) == answer(
        "success", latest, "queued mail removed"
    )
    assert await ask(port, {"removeQueuedMail": latest}) == answer(
        "error", None, "queued mail not found"
    )
    for offset in (1, 2, 3):
        await ask(port, {"queueMail": {**mails[0], "scheduleTime": later + offset}})
    assert await ask(port, {"clearQueue": None}) == answer(
        "success", {"removed": 3}, "removed 3 mails in queue"
    )
    assert await ask(port, {"getQueueList": None}) == answer(
        "success", {"items": [], "total": 0}, "found 0 mails in queue"
    )
    assert len(smtp.received()) == 1


async def test_only_the_gateways_own_queued_mail_is_its_queue(
    settings: Settings, channel: AbstractChannel, store: JobStore, port: int
) -> None:
    later = "2099-01-01T00:00:00+00:00"
    others = {
        # Another domain's mail, and the gateway domain's mail another producer published.
        "other-domain-job": job(domain="other.example", **{"from": "app@other.example"}),
        "other-producer-job": job(domain=DOMAIN, **{"from": f"app@{DOMAIN}"}),
    }
    for job_id, body in others.items():
        await publish_raw(
            channel, Names(settings.prefix), encode({**body, "id": job_id, "send_at": later})
        )
    async with asyncio.timeout(20):
        for job_id in others:
            while await store.get(job_id) is None:  # noqa: ASYNC110 (a record, no event)
                await asyncio.sleep(0.05)
    assert (await ask(port, {"getQueueList": None}))["data"] == {"items": [], "total": 0}
    for job_id in others:
        for request in ("getQueuedMail", "removeQueuedMail"):
            refused = await ask(port, {request: job_id})
            assert refused == answer("error", None, "queued mail not found")
        moved = await ask(port, {"updateQueuedMail": job_id, "content": {"scheduleTime": 1}})
        assert moved == answer("error", None, "queued mail not found")
    assert await ask(port, {"clearQueue": None}) == answer(
        "success", {"removed": 0}, "removed 0 mails in queue"
    )
    for job_id in others:
        record = await store.get(job_id)
        assert record is not None
        assert record["status"] == "scheduled"


async def test_the_gateways_templates_serve_its_domains_mail_only(
    settings: Settings, channel: AbstractChannel, store: JobStore, port: int
) -> None:
    added = {"addTemplate": "private.html", "content": "<p>for daemon.test only</p>"}
    assert await ask(port, added) == answer("success", "private.html", "template added")
    names = Names(settings.prefix)
    borrowed = job(
        domain="other.example",
        template={"name": "private.html"},
        subject="Borrowed",
        **{"from": "app@other.example"},
    )
    del borrowed["text"]  # a templated job takes its bodies from the template
    await publish_raw(channel, names, encode(borrowed))
    async with asyncio.timeout(20):
        [dead] = await take(channel, names.dead, 1)
    assert dead.headers["x-mailbus-reason"] == "template"
    assert "no template named 'private.html'" in str(dead.headers["x-mailbus-error"])


async def test_send_mail_through_an_unreachable_outbox_fails_and_is_kept(
    settings: Settings, smtp: CaptureServer, store: JobStore, channel: AbstractChannel
) -> None:
    closed = free_port()  # nothing listens: the old suites' SMTP host was unreachable
    unreachable = settings.model_copy(
        update={"default_smtp_url": SecretStr(f"smtp://127.0.0.1:{closed}")}
    )
    running = RunningWorker(unreachable)
    try:
        async with daemon_gateway(unreachable) as port:
            mail = {"to": ["user@example.test"], "ccList": [], "bccList": [], "subject": "s"}
            failed = await ask(port, {"sendMail": {**mail, "body": "<html>x</html>"}})
            assert failed == answer(
                "error", "SMTP Error: Could not connect to SMTP host.", "failed to send mail"
            )
            # Kept for its retry, as the old daemon kept it for resend, and counted.
            [kept] = (await ask(port, {"getQueueList": None}))["data"]["items"]
            record = await store.get(kept)
            assert record is not None
            assert record["status"] == "scheduled"
            assert await ask(port, {"status": None}) == answer(
                "success", {"sent": 0, "failed": 1}, None
            )
    finally:
        await running.shutdown()
    assert smtp.received() == []


async def test_the_old_template_folder_is_the_domains_templates(
    settings: Settings, smtp: CaptureServer, store: JobStore, tmp_path: Path
) -> None:
    folder = tmp_path / "Template" / "html"
    folder.mkdir(parents=True)
    (folder / "test-1.html").write_text(TEMPLATE_HTML)  # deployed as the old daemon's were
    (folder / ".hidden.html").write_text("<p>not a template</p>")
    (folder / "broken.html").write_text("<p>{% if %}</p>")  # does not compile: left out
    templates = TemplateStore(store.database)
    await templates.put("shared.html", "Shared", None, "<p>the operator's</p>")
    (folder / "shared.html").write_text("<p>a file cannot take another's name</p>")
    kept = settings.model_copy(update={"gateway_template_dir": folder})
    running = RunningWorker(kept)
    try:
        async with daemon_gateway(kept) as port:
            assert await ask(port, {"getTemplateList": None}) == answer(
                "success", {"items": ["test-1.html"], "total": 1}, "found 1 templates"
            )
            mail = {"to": ["reader@example.org"], "subject": "From the folder"}
            templated = {**mail, "useTemplate": "test-1.html", "replaceContent": {"NAME": "Bo"}}
            sent = await ask(port, {"sendMail": templated})
            assert sent == answer("success", None, "mail sent successfully")
            body = smtp.received()[0].message().get_body(("html",))
            assert body is not None
            assert "<h1>Hello Bo</h1>" in body.get_content()

            added = {"addTemplate": "test-2.html", "content": "<p>two</p>"}
            assert await ask(port, added) == answer("success", "test-2.html", "template added")
            assert (folder / "test-2.html").read_text() == "<p>two</p>"
            (folder / "test-1.html").write_text("<p>changed on disk</p>")
            assert await ask(port, {"getTemplate": "test-1.html"}) == answer(
                "success", "<p>changed on disk</p>", "template found"
            )
            # A file grown too large is left out: the version taken before is kept.
            (folder / "test-2.html").write_text("<p>" + "x" * 2**20 + "</p>")
            assert await ask(port, {"getTemplate": "test-2.html"}) == answer(
                "success", "<p>two</p>", "template found"
            )
            (folder / "test-2.html").unlink()  # removed by a deploy: gone at the next request
            assert await ask(port, {"getTemplate": "test-2.html"}) == answer(
                "error", None, "unable to get template"
            )
            assert await ask(port, {"removeTemplate": "test-1.html"}) == answer(
                "success", "test-1.html", "template removed"
            )
            assert not (folder / "test-1.html").exists()
            # A link is replaced by the file written, never followed out of the folder.
            outside = tmp_path / "outside.txt"
            outside.write_text("untouched")
            (folder / "linked.html").symlink_to(outside)
            linked = {"addTemplate": "linked.html", "content": "<p>linked</p>"}
            assert await ask(port, linked) == answer("success", "linked.html", "template added")
            assert outside.read_text() == "untouched"
            assert not (folder / "linked.html").is_symlink()
            (folder / "test-3.html").write_text("<p>three</p>")
            assert await ask(port, {"clearTemplate": None}) == answer(
                "success", {"removed": 2}, "removed 2 templates"
            )
    finally:
        await running.shutdown()
    assert sorted(path.name for path in folder.iterdir()) == [".hidden.html"]
    assert [doc["_id"] for doc in await templates.find()] == ["shared.html"]
