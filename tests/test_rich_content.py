"""Rich mail end to end: attachments from URLs, paths and inline data, templates, custom
headers, charsets and the suppression list, through a real broker, database and SMTP server.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from dataclasses import replace
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pydantic import SecretStr

from consumer.amqp.publish import publish_job
from consumer.clock import utcnow
from consumer.core.names import Names
from consumer.core.outboxes import outbox_from_url
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from consumer.store.outboxes import OutboxStore, outbox_document
from consumer.store.suppressions import SuppressionStore
from consumer.store.templates import TemplateStore
from deploy.devstack.processes import mailbus
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import drain_events, job, listen_events, take, until
from tests.conftest import RunningWorker, settled_record
from tests.http_files import FileServer, Route

PDF = b"%PDF-1.4\n" + bytes(range(256)) * 200
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8
CSV = "name;amount\nZoë;12,50\n".encode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    """An attachment directory holding a CSV, next to a secret it must not reach."""
    root = tmp_path / "attachments"
    root.mkdir()
    (root / "report.csv").write_bytes(CSV)
    (tmp_path / "secret.txt").write_text("the secret")
    (root / "escape").symlink_to(tmp_path / "secret.txt")
    return root


@pytest.fixture
def rich(settings: Settings, allowed: Path, tmp_path: Path) -> Settings:
    """Settings that allow the loopback file server and the attachment directory."""
    spool = tmp_path / "spool"
    spool.mkdir()
    return settings.model_copy(
        update={
            "attachment_dirs": [allowed],
            "attachment_allow_private": True,
            "attachment_tmp_dir": spool,
        }
    )


def attachments(files: FileServer) -> list[dict[str, Any]]:
    """One of each kind: an inline logo by URL, a PDF by URL, a CSV by path, inline data."""
    files.route("/img/logo.png", Route(body=PNG, content_type="image/png"))
    files.route("/docs/download", Route(status=302, location="/docs/Invoice%202030.pdf"))
    files.route("/docs/Invoice%202030.pdf", Route(body=PDF, content_type="application/pdf"))
    return [
        {"url": files.url("/img/logo.png"), "inline": True, "cid": "logo"},
        {"url": files.url("/docs/download"), "filename": "Rechnung Mai 2030 · Zoë.pdf"},
        {"path": "report.csv"},
        {"filename": "notes.txt", "content_b64": base64.b64encode(b"plain notes").decode()},
    ]


async def dead_letters(
    settings: Settings, channel: AbstractChannel, count: int
) -> list[AbstractIncomingMessage]:
    """Run a worker with ``settings`` until ``count`` dead letters have come out."""
    running = RunningWorker(settings)
    try:
        async with asyncio.timeout(20):
            return await take(channel, Names(settings.prefix).dead, count)
    finally:
        await running.shutdown()


def parts_of(msg: EmailMessage) -> dict[str, tuple[str, str]]:
    """Each non-body part by filename (or cid): content type and hash of the bytes."""
    found = {}
    for part in msg.walk():
        body_text = part.get_content_maintype() == "text" and not part.get_filename()
        if part.is_multipart() or body_text:
            continue
        key = part.get_filename() or str(part["Content-ID"])
        found[key] = (part.get_content_type(), sha(part.get_payload(decode=True)))
    return found


async def test_every_kind_of_attachment_arrives_intact(
    rich: Settings, channel: AbstractChannel, smtp: CaptureServer, files: FileServer
) -> None:
    body = job(
        text="Your invoice is attached.",
        html='<p>Your invoice</p><img src="cid:logo">',
        attachments=attachments(files),
    )
    await publish_job(channel, body, names=Names(rich.prefix))
    running = RunningWorker(rich)
    try:
        async with asyncio.timeout(20):
            [mail] = await smtp.wait_for(1)
    finally:
        await running.shutdown()
    msg = mail.message()
    assert msg.get_content_type() == "multipart/mixed"
    alternative, *attached = msg.iter_parts()
    plain, related = alternative.iter_parts()
    assert (plain.get_content_type(), related.get_content_type()) == (
        "text/plain",
        "multipart/related",
    )
    html, logo = related.iter_parts()
    assert html.get_content_type() == "text/html"
    assert (logo["Content-ID"], logo.get_content_disposition()) == ("<logo>", "inline")
    assert parts_of(msg) == {
        "logo.png": ("image/png", sha(PNG)),
        "Rechnung Mai 2030 · Zoë.pdf": ("application/pdf", sha(PDF)),
        "report.csv": ("text/csv", sha(CSV)),
        "notes.txt": ("text/plain", sha(b"plain notes")),
    }
    assert [p.get_content_disposition() for p in attached] == ["attachment"] * 3
    assert rich.attachment_tmp_dir is not None
    assert list(rich.attachment_tmp_dir.iterdir()) == []  # fetched files never stay


async def test_private_addresses_are_refused_by_default(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    worker: RunningWorker,
    files: FileServer,
) -> None:
    names = Names(settings.prefix)
    await publish_job(channel, job(attachments=attachments(files)[:2]), names=names)
    async with asyncio.timeout(20):
        [dead] = await take(channel, names.dead, 1)
    assert dead.headers["x-mailbus-reason"] == "attachment"
    assert "loopback address 127.0.0.1" in str(dead.headers["x-mailbus-error"])
    assert files.hits == []
    assert smtp.received() == []


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("../../../../../../etc/passwd", "outside MAILBUS_ATTACHMENT_DIRS"),
        ("/etc/passwd", "outside MAILBUS_ATTACHMENT_DIRS"),
        ("escape", "outside MAILBUS_ATTACHMENT_DIRS"),
    ],
)
async def test_paths_outside_the_allowed_directories_are_dead_lettered(
    rich: Settings, channel: AbstractChannel, smtp: CaptureServer, path: str, error: str
) -> None:
    await publish_job(channel, job(attachments=[{"path": path}]), names=Names(rich.prefix))
    [dead] = await dead_letters(rich, channel, 1)
    assert dead.headers["x-mailbus-reason"] == "attachment"
    assert error in str(dead.headers["x-mailbus-error"])
    assert smtp.received() == []


async def test_a_url_not_there_yet_is_retried_until_it_is(
    rich: Settings, channel: AbstractChannel, smtp: CaptureServer, files: FileServer
) -> None:
    names = Names(rich.prefix)
    events = await listen_events(channel, names)
    url = files.url("/late.pdf")
    await publish_job(channel, job(id="late", attachments=[{"url": url}]), names=names)
    running = RunningWorker(rich)
    try:
        async with asyncio.timeout(20):
            while "/late.pdf" not in files.hits:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        files.route("/late.pdf", Route(body=PDF, content_type="application/pdf"))
        async with asyncio.timeout(20):
            [mail] = await smtp.wait_for(1)
    finally:
        await running.shutdown()
    assert parts_of(mail.message())["late.pdf"] == ("application/pdf", sha(PDF))
    deferred = [body for key, body in await drain_events(channel, events) if key == "mail.deferred"]
    assert deferred
    assert "HTTP 404" in deferred[0]["error"]


async def test_a_message_over_the_size_limit_is_dead_lettered(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer
) -> None:
    small = settings.model_copy(update={"max_message_bytes": 4096})
    # Within the attachments' share (3/4 of the limit), yet too large once encoded with
    # the headers and the text.
    data = base64.b64encode(b"\0" * 3000).decode()
    body = job(attachments=[{"filename": "a.bin", "content_b64": data}])
    await publish_job(channel, body, names=Names(small.prefix))
    [dead] = await dead_letters(small, channel, 1)
    assert dead.headers["x-mailbus-reason"] == "too_large"
    assert "limit of 4096" in str(dead.headers["x-mailbus-error"])


async def test_templated_jobs_render_and_record_their_version(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    worker: RunningWorker,
    store: JobStore,
) -> None:
    templates = TemplateStore(store.database)
    await templates.put("welcome", "Welcome {{ name }}", "Old {{ name }}", None)
    await templates.put("welcome", "Welcome, {{ name }}!", "Hi {{ name }}", "<p>Hi {{ name }}</p>")
    names = Names(settings.prefix)
    events = await listen_events(channel, names)
    data = {"name": "Zoë <admin>"}
    for job_id, ref in (
        ("t1", {"name": "welcome", "data": data}),
        ("t2", {"name": "welcome", "data": data, "version": 1}),
        ("t3", {"name": "welcome", "data": {}}),
        ("t4", {"name": "nope", "data": {}}),
    ):
        templated = {k: v for k, v in job(id=job_id, template=ref).items() if k != "text"}
        await publish_job(channel, {**templated, "subject": ""}, names=names)
    async with asyncio.timeout(20):
        mails = await smtp.wait_for(2)
        dead = await take(channel, names.dead, 2)
    by_subject = {m.message()["Subject"]: m.message() for m in mails}
    latest = by_subject["Welcome, Zoë <admin>!"]
    assert latest.get_body(("plain",)).get_content().strip() == "Hi Zoë <admin>"  # type: ignore[union-attr]
    assert latest.get_body(("html",)).get_content().strip() == "<p>Hi Zoë &lt;admin&gt;</p>"  # type: ignore[union-attr]
    assert by_subject["Welcome Zoë <admin>"].get_content().strip() == "Old Zoë <admin>"
    reasons = {d.message_id: d.headers["x-mailbus-reason"] for d in dead}
    errors = {d.message_id: str(d.headers["x-mailbus-error"]) for d in dead}
    assert reasons == {"t3": "template", "t4": "template"}
    assert "'name' is undefined" in errors["t3"]
    assert "no template named 'nope'" in errors["t4"]
    record = await store.get("t1")
    assert record is not None
    assert record["template"] == {"name": "welcome", "version": 2}
    sent = {b["id"]: b for k, b in await drain_events(channel, events) if k == "mail.sent"}
    assert sent["t2"]["template"] == {"name": "welcome", "version": 1}


async def test_suppressed_recipients_are_left_out(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    worker: RunningWorker,
    store: JobStore,
) -> None:
    suppressions = SuppressionStore(store.database)
    await suppressions.add("Bob@Example.org", "asked to stop")
    names = Names(settings.prefix)
    events = await listen_events(channel, names)
    three = ["ann@example.org", "bob@example.org", "cy@example.org"]
    await publish_job(channel, job(id="three", to=three), names=names)
    await publish_job(channel, job(id="only-bob", to=["bob@example.org"]), names=names)
    async with asyncio.timeout(20):
        [mail] = await smtp.wait_for(1)
        [dead] = await take(channel, names.dead, 1)
    assert mail.rcpt_tos == ("ann@example.org", "cy@example.org")
    assert (dead.message_id, dead.headers["x-mailbus-reason"]) == ("only-bob", "suppressed")
    record = await settled_record(store, "three")
    assert (record["status"], record["suppressed"]) == ("sent", ["bob@example.org"])
    sent = [b for k, b in await drain_events(channel, events) if k == "mail.sent"]
    assert sent[0]["suppressed"] == ["bob@example.org"]


async def test_unknown_recipients_are_suppressed_automatically(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    worker: RunningWorker,
    store: JobStore,
) -> None:
    smtp.faults.refuse_rcpt("gone@example.org", "550 5.1.1 <gone@example.org>: User unknown")
    smtp.faults.refuse_rcpt("picky@example.org", "550 5.7.1 Message rejected as spam")
    names = Names(settings.prefix)
    recipients = ["ann@example.org", "gone@example.org", "picky@example.org"]
    await publish_job(channel, job(id="first", to=recipients), names=names)
    async with asyncio.timeout(20):
        [mail] = await smtp.wait_for(1)
    assert mail.rcpt_tos == ("ann@example.org",)
    suppressions = SuppressionStore(store.database)
    await until(lambda: _suppressed(suppressions, "gone@example.org"), 10)
    [entry] = await suppressions.find()
    # Suppressed for the job's domain only: another domain's mail still goes.
    assert (entry["address"], entry["domain"], entry["list"], entry["source"]) == (
        "gone@example.org",
        "example.com",
        None,
        "bounce",
    )
    assert "5.1.1" in entry["reason"]
    days = (entry["expire_at"] - utcnow()).total_seconds() / 86400
    assert 29.9 < days <= 30
    # The next mail to the unknown address never reaches the server; a spam refusal is not
    # a reason to stop writing to someone.
    await publish_job(channel, job(id="second", to=["gone@example.org"]), names=names)
    await publish_job(channel, job(id="third", to=["picky@example.org"]), names=names)
    async with asyncio.timeout(20):
        [dead] = await take(channel, names.dead, 1)
        await smtp.wait_for(2)
    assert (dead.message_id, dead.headers["x-mailbus-reason"]) == ("second", "suppressed")


async def _suppressed(suppressions: SuppressionStore, address: str) -> bool:
    return address in await suppressions.among([address], domain="example.com")


async def test_charset_per_job_and_per_outbox(
    keyed: Settings, channel: AbstractChannel, smtp: CaptureServer
) -> None:
    async with JobStore.connect(keyed) as jobs:
        outbox = replace(outbox_from_url(smtp.url, name="latin"), charset="iso-8859-1")
        doc = outbox_document(outbox, "example.com", None, None, utcnow())
        assert await OutboxStore(jobs.database).put(doc, replace=False)
    names = Names(keyed.prefix)
    await publish_job(channel, job(id="outbox", text="Grüße"), names=names)
    await publish_job(channel, job(id="job", text="Grüße", charset="utf-8"), names=names)
    await publish_job(channel, job(id="euro", text="5 €"), names=names)
    running = RunningWorker(keyed)
    try:
        async with asyncio.timeout(20):
            mails = await smtp.wait_for(2)
            [dead] = await take(channel, names.dead, 1)
    finally:
        await running.shutdown()
    charsets = sorted(str(m.message().get_content_charset()) for m in mails)
    assert charsets == ["iso-8859-1", "utf-8"]
    assert {m.message().get_content().strip() for m in mails} == {"Grüße"}
    assert dead.message_id == "euro"
    assert dead.headers["x-mailbus-reason"] == "invalid"
    assert "iso-8859-1" in str(dead.headers["x-mailbus-error"])


async def test_smtputf8_is_used_only_when_offered(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer, worker: RunningWorker
) -> None:
    names = Names(settings.prefix)
    await publish_job(channel, job(id="utf8", to=["zoë@example.org"]), names=names)
    # Only a header holds the non-ASCII address: the mail still needs SMTPUTF8.
    await publish_job(channel, job(id="utf8-reply", reply_to="zoë@bücher.example"), names=names)
    async with asyncio.timeout(20):
        mails = await smtp.wait_for(2)
    by_id = {str(mail.message()["Subject"]) + mail.rcpt_tos[0]: mail for mail in mails}
    assert by_id["Hellozoë@example.org"].message()["To"].addresses[0].addr_spec == (
        "zoë@example.org"
    )
    replied = by_id["Hellorcpt@example.org"].message()
    assert replied["Reply-To"].addresses[0].addr_spec == "zoë@bücher.example"
    assert replied["Message-ID"] is not None
    plain = CaptureServer(smtputf8=False)
    plain.start()
    try:
        await worker.shutdown()
        ascii_only = settings.model_copy(update={"default_smtp_url": SecretStr(plain.url)})
        other = Names(ascii_only.prefix)
        running = RunningWorker(ascii_only)
        try:
            await publish_job(channel, job(id="no-utf8", to=["zoë@example.org"]), names=other)
            await publish_job(
                channel, job(id="no-utf8-reply", reply_to="zoë@bücher.example"), names=other
            )
            async with asyncio.timeout(20):
                failed = await take(channel, other.dead, 2)
        finally:
            await running.shutdown()
    finally:
        plain.stop()
    for letter in failed:
        assert letter.headers["x-mailbus-reason"] == "permanent"
        assert "SMTPUTF8" in str(letter.headers["x-mailbus-error"])
    assert plain.received() == []


async def test_suppress_commands(settings: Settings) -> None:
    added = await mailbus(settings, "suppress", "add", "A@Example.org", "b@example.org")
    assert added.returncode == 0, added.stderr
    timed = await mailbus(settings, "suppress", "add", "c@example.org", "--days", "2")
    assert "until" in timed.stdout
    listed = await mailbus(settings, "suppress", "ls")
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
    assert sorted(rows) == ["a@example.org", "b@example.org", "c@example.org"]
    assert [rows["a@example.org"][i] for i in (1, 2, 4)] == ["global", "manual", "-"]
    assert rows["c@example.org"][4] != "-"
    removed = await mailbus(settings, "suppress", "rm", "a@example.org", "nobody@example.org")
    assert removed.returncode == 1
    assert "'nobody@example.org' was not suppressed" in removed.stderr
    after = await mailbus(settings, "suppress", "ls")
    assert "a@example.org" not in after.stdout
