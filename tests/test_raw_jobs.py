"""Raw jobs: a producer's RFC 5322 message, sent as given to the envelope it names."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
from aio_pika.abc import AbstractChannel

from consumer.amqp.publish import publish_job
from consumer.core.message import parse_job
from consumer.core.mime import message_id_for, raw_mail
from consumer.core.names import Names
from consumer.core.outboxes import Outbox
from consumer.core.raw import decoded_size
from consumer.core.refusals import InvalidJobError, JobTooLargeError
from consumer.mail.sendmail import SendmailPipe
from consumer.settings import Settings
from consumer.store.domains import DomainStore
from consumer.store.jobs import JobStore
from consumer.store.suppressions import SuppressionStore
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import encode, job, take
from tests.conftest import RunningWorker, settled_record
from tests.test_sendmail import sendmail as sendmail
from tests.test_sendmail import spooled

HEAD = (
    b"From: Sender <sender@example.com>\r\n"
    b"To: Ann <ann@example.org>\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= from a raw job\r\n"
    b"X-Long: " + b"x" * 120 + b"\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
)
# Odd spacing, trailing blanks, a line starting with a dot, 8-bit text: all kept as given.
BODY = "Hello,  \r\n\r\n.a dot line\r\n\tcafé — 日本語 \r\n-- \r\nbye\r\n".encode()
DATED = b"Date: Tue, 01 Jul 2025 10:00:00 +0000\r\nMessage-ID: <given@example.com>\r\n"


def raw_job(message: bytes, **fields: Any) -> dict[str, Any]:
    """A valid raw job for ``message``, with ``fields`` overriding the defaults."""
    body: dict[str, Any] = {
        "domain": "example.com",
        "raw_b64": base64.b64encode(message).decode(),
        "mail_from": "bounces@example.com",
        "rcpt_to": ["ann@example.org"],
    }
    body.update(fields)
    return body


def parsed(message: bytes, **fields: Any) -> Any:
    return parse_job(encode(raw_job(message, **fields)), "raw-1")[0]


# --- the contract, without servers ---


def test_a_raw_job_names_its_envelope_and_its_message_its_headers() -> None:
    message = HEAD + b"Bcc: hidden@example.net\r\n\r\n" + BODY
    parsed_job = parsed(
        message, rcpt_to=["ann@example.org", "hidden@example.net", "ann@example.org"]
    )
    assert parsed_job.recipients() == ["ann@example.org", "hidden@example.net"]
    assert parsed_job.envelope_sender() == "bounces@example.com"
    assert parsed_job.sender_addresses() == ["bounces@example.com", "sender@example.com"]
    assert parsed_job.subject_line() == "Grüße from a raw job"


@pytest.mark.parametrize(
    "field",
    [
        {"from": "a@example.com"},
        {"to": ["b@example.org"]},
        {"cc": []},
        {"subject": "x"},
        {"text": "x"},
        {"html": "<p>x</p>"},
        {"template": {"name": "t"}},
        {"headers": {"X-A": "b"}},
        {"charset": "utf-8"},
        {"attachments": []},
    ],
)
def test_a_raw_job_takes_none_of_the_built_fields(field: dict[str, Any]) -> None:
    with pytest.raises(InvalidJobError, match="cannot be set") as refused:
        parsed(HEAD + b"\r\n" + BODY, **field)
    assert next(iter(field)) in str(refused.value)


def test_a_raw_job_needs_its_whole_envelope_and_a_built_one_its_parts() -> None:
    message = HEAD + b"\r\n" + BODY
    for missing in ("mail_from", "rcpt_to"):
        body = {k: v for k, v in raw_job(message).items() if k != missing}
        with pytest.raises(InvalidJobError, match=f"a raw job needs .*: no {missing}"):
            parse_job(encode(body), None)
    with pytest.raises(InvalidJobError, match="no raw_b64"):
        parse_job(encode(job(mail_from="b@example.com")), None)
    for recipients in ([], ["a@example.org"] * 1001):
        with pytest.raises(InvalidJobError, match="rcpt_to"):
            parsed(message, rcpt_to=recipients)
    with pytest.raises(InvalidJobError, match="invalid email address"):
        parsed(message, mail_from="not an address")
    without_from = {k: v for k, v in job().items() if k != "from"}
    with pytest.raises(InvalidJobError, match="a job needs from and to"):
        parse_job(encode(without_from), None)


MALFORMED = [
    pytest.param("not base64!", "raw_b64 is not base64", id="not-base64"),
    pytest.param(
        b"From: a@example.com\r\nSubject: no body follows\r\n", "no blank line", id="no-separator"
    ),
    pytest.param(
        b"From: a@example.com\r\nX: " + b"a" * 1000 + b"\r\n\r\nb", "over 998", id="long-line"
    ),
    pytest.param(
        b"From: a@example.com\r\nX: y\nZ: z\r\n\r\nb", "mixes CRLF and LF", id="crlf-lf-mix"
    ),
    pytest.param(b"From: a@example.com\rBcc: v@example.net\r\n\r\nb", "a CR that", id="bare-cr"),
    pytest.param(b"Subject: who?\r\n\r\nb", "one From header, not 0", id="no-from"),
    pytest.param(b"From: a@example.com\r\nFrom: b@example.com\r\n\r\nb", "not 2", id="two-from"),
    pytest.param(b"From: nobody\r\n\r\nb", "From is malformed", id="from-no-address"),
    # Read only in part by the parser: another reader might see the second address.
    pytest.param(
        b"From: a@example.com <b@victim.example\r\n\r\nb", "From is malformed", id="from-half-read"
    ),
    pytest.param(
        b"From: a@example.com;b@victim.example\r\n\r\nb", "malformed", id="from-semicolon"
    ),
    pytest.param(
        b"From: a@example.com\r\nX: a" + (b"\r\n y" * 20_000) + b"\r\n\r\nb",
        "header section is over",
        id="huge-header",
    ),
    pytest.param(b"From: a@example.com\r\nX: \0\r\n\r\nb", "NUL", id="nul"),
    pytest.param(b"From: a@example.com\r\nno colon here\r\n\r\nb", "malformed", id="not-a-field"),
    pytest.param(b" folded\r\nFrom: a@example.com\r\n\r\nb", "malformed", id="continuation-first"),
    pytest.param(b"From a@example.com Mon\r\nFrom: a@example.com\r\n\r\nb", "mbox", id="mbox"),
    pytest.param(
        b"From: a@example.com\r\nX: \xff\xfe\r\n\r\nb", "neither ASCII nor UTF-8", id="latin1"
    ),
]


def _raw_b64(sample: str | bytes) -> str:
    return sample if isinstance(sample, str) else base64.b64encode(sample).decode()


@pytest.mark.parametrize(("sample", "error"), MALFORMED)
def test_a_malformed_raw_message_is_an_invalid_job(sample: str | bytes, error: str) -> None:
    body = raw_job(b"", raw_b64=_raw_b64(sample))
    with pytest.raises(InvalidJobError, match=error) as refused:
        parse_job(encode(body), None)
    assert refused.value.reason == "invalid"


def test_a_raw_message_too_large_is_refused_before_it_is_decoded() -> None:
    for size in range(1, 12):
        text = base64.b64encode(b"a" * size).decode()
        assert decoded_size(text) == size
    message = HEAD + b"\r\n" + BODY
    body = encode(raw_job(message))
    with pytest.raises(JobTooLargeError, match="raw message is") as refused:
        parse_job(body, None, max_message_bytes=len(message) - 1)
    assert refused.value.reason == "too_large"
    assert parse_job(body, None, max_message_bytes=len(message))[0].raw_message() is not None


def test_the_mail_of_a_raw_job_is_its_bytes_with_only_what_is_missing_added() -> None:
    now = datetime(2025, 7, 1, 12, 0, tzinfo=UTC)
    plain = parsed(HEAD + b"\r\n" + BODY)
    mail = raw_mail(plain, "raw-1", now, limit=10_000)
    expected_top = (
        f"Message-ID: {message_id_for('raw-1', 'example.com')}\r\n"
        "Date: Tue, 01 Jul 2025 12:00:00 +0000\r\n"
    ).encode()
    assert mail.wire == expected_top + HEAD + b"\r\n" + BODY
    assert mail.message is None
    assert not mail.utf8
    dated = parsed(DATED + HEAD + b"\r\n" + BODY)
    assert raw_mail(dated, "raw-1", now, limit=10_000).wire == DATED + HEAD + b"\r\n" + BODY
    with pytest.raises(Exception, match="more than the limit") as refused:
        raw_mail(dated, "raw-1", now, limit=100)
    assert getattr(refused.value, "reason", None) == "too_large"


def test_bcc_fields_are_left_out_and_lf_line_ends_sent_as_crlf() -> None:
    message = (
        b"From: a@example.com\nBcc: one@example.net,\n two@example.net\nSubject: s\n\nl1\nl2\n"
    )
    mail = raw_mail(
        parsed(DATED.replace(b"\r\n", b"\n") + message), "x", datetime.now(UTC), limit=10_000
    )
    assert b"example.net" not in mail.wire
    assert mail.wire == DATED + b"From: a@example.com\r\nSubject: s\r\n\r\nl1\r\nl2\r\n"


def test_a_raw_job_may_ask_for_an_unsubscribe_link_for_one_recipient() -> None:
    message = DATED + HEAD + b"\r\n" + BODY
    asked = {"list": "news", "mailto": "unsub@example.com"}
    assert parsed(message, unsubscribe=asked).unsubscribe is not None
    with pytest.raises(InvalidJobError, match="exactly one recipient in rcpt_to"):
        parsed(message, rcpt_to=["ann@example.org", "bob@example.org"], unsubscribe=asked)
    own = b"List-Unsubscribe: <https://own.example/u>\r\n" + message
    with pytest.raises(InvalidJobError, match="writes these headers itself: list-unsubscribe"):
        parsed(own, unsubscribe=asked)
    # The link and the mailto go on lines of their own, at the top; the rest as given.
    added = {"List-Unsubscribe": "<https://u.example/t>, <mailto:u@example.com>", "X-B": "c"}
    mail = raw_mail(
        parsed(message, unsubscribe=asked),
        "raw-1",
        datetime.now(UTC),
        limit=10_000,
        added_headers=added,
    )
    top = b"List-Unsubscribe: <https://u.example/t>,\r\n <mailto:u@example.com>\r\nX-B: c\r\n"
    assert mail.wire == top + message


def test_utf8_headers_need_smtputf8() -> None:
    message = "From: Zoë <zoë@example.com>\r\nSubject: ¡hola!\r\n\r\nb\r\n".encode()
    parsed_job = parsed(message)
    assert parsed_job.sender_addresses() == ["bounces@example.com", "zoë@example.com"]
    assert raw_mail(parsed_job, "x", datetime.now(UTC), limit=10_000).utf8


# --- through the worker, against the real broker, store and SMTP server ---


async def test_a_raw_job_arrives_as_given(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    worker: RunningWorker,
    store: JobStore,
) -> None:
    names = Names(settings.prefix)
    bare = HEAD + b"Bcc: hidden@example.net\r\n\r\n" + BODY
    rcpt = ["ann@example.org", "hidden@example.net"]
    bare_id = await publish_job(channel, raw_job(bare, rcpt_to=rcpt), names=names)
    await publish_job(channel, raw_job(DATED + HEAD + b"\r\n" + BODY, id="dated"), names=names)

    async with asyncio.timeout(20):
        mails = await smtp.wait_for(2)
    by_id = {m.message()["Message-ID"]: m for m in mails}
    first = by_id[message_id_for(bare_id, "example.com")]
    assert first.mail_from == "bounces@example.com"
    assert first.rcpt_tos == tuple(rcpt)
    top, rest = first.data.split(b"\r\n", 2)[:2], first.data.split(b"\r\n", 2)[2]
    assert top[0] == f"Message-ID: {message_id_for(bare_id, 'example.com')}".encode()
    assert abs(parsedate_to_datetime(top[1].decode()[6:]) - datetime.now(UTC)).total_seconds() < 30
    assert rest == HEAD + b"\r\n" + BODY  # the Bcc field left out, the rest byte for byte
    assert b"hidden@example.net" not in first.data
    dated = by_id["<given@example.com>"]
    assert dated.data == DATED + HEAD + b"\r\n" + BODY
    assert dated.message().get_all("Message-ID") == ["<given@example.com>"]
    assert dated.message().get_all("Date") == ["Tue, 01 Jul 2025 10:00:00 +0000"]
    record = await settled_record(store, bare_id)
    assert (record["status"], record["recipients"]) == ("sent", 2)
    assert (record["from"], record["subject"]) == ("bounces@example.com", "Grüße from a raw job")


async def test_a_raw_job_is_held_to_the_domains_senders_and_suppressions(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    worker: RunningWorker,
    store: JobStore,
) -> None:
    await DomainStore(store.database).put("example.net", None, ["app"], replace=False)
    await SuppressionStore(store.database).add("bob@example.org", "asked to stop")
    names = Names(settings.prefix)
    message = HEAD + b"\r\n" + BODY
    foreign_from = message.replace(b"sender@example.com", b"boss@example.net")
    await publish_job(channel, raw_job(foreign_from, id="header"), names=names)
    await publish_job(
        channel, raw_job(message, id="envelope", mail_from="b@example.net"), names=names
    )
    await publish_job(
        channel,
        raw_job(message, id="kept", rcpt_to=["bob@example.org", "cy@example.org"]),
        names=names,
    )
    await publish_job(
        channel, raw_job(message, id="all-gone", rcpt_to=["bob@example.org"]), names=names
    )

    async with asyncio.timeout(20):
        dead = await take(channel, names.dead, 3)
        [mail] = await smtp.wait_for(1)
    reasons = {
        d.message_id: (d.headers["x-mailbus-reason"], str(d.headers["x-mailbus-error"]))
        for d in dead
    }
    assert reasons == {
        "header": (
            "unauthorized",
            "sender domain example.net belongs to a registered domain, not to example.com",
        ),
        "envelope": (
            "unauthorized",
            "sender domain example.net belongs to a registered domain, not to example.com",
        ),
        "all-gone": ("suppressed", "every recipient is suppressed: bob@example.org"),
    }
    assert mail.rcpt_tos == ("cy@example.org",)
    record = await settled_record(store, "kept")
    assert record["suppressed"] == ["bob@example.org"]
    assert await store.get("header") is None  # refused before anything is recorded


async def test_malformed_raw_jobs_are_dead_lettered_and_the_worker_goes_on(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer, worker: RunningWorker
) -> None:
    names = Names(settings.prefix)
    for n, case in enumerate(MALFORMED):
        sample, _ = case.values
        await publish_job(
            channel, raw_job(b"", id=f"bad-{n}", raw_b64=_raw_b64(sample)), names=names
        )
    await publish_job(channel, raw_job(HEAD + b"\r\n" + BODY, id="good"), names=names)

    async with asyncio.timeout(30):
        dead = await take(channel, names.dead, len(MALFORMED))
        [mail] = await smtp.wait_for(1)
    for letter in dead:
        n = int(str(letter.message_id).removeprefix("bad-"))
        assert letter.headers["x-mailbus-reason"] == "invalid", letter.message_id
        assert MALFORMED[n].values[1] in str(letter.headers["x-mailbus-error"])
        assert json.loads(letter.body)["id"] == letter.message_id  # kept whole, to replay
    assert mail.rcpt_tos == ("ann@example.org",)
    assert not worker.task.done()


async def test_a_raw_job_with_utf8_headers_and_envelope_goes_with_smtputf8(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer, worker: RunningWorker
) -> None:
    head = "From: Zoë <zoë@example.com>\r\nTo: jürgen@example.org\r\nSubject: ¡hola!\r\n"
    message = DATED + (head + "\r\nhé\r\n").encode()
    body = raw_job(message, mail_from="zoë@example.com", rcpt_to=["jürgen@example.org"])
    await publish_job(channel, body, names=Names(settings.prefix))
    async with asyncio.timeout(20):
        [mail] = await smtp.wait_for(1)
    assert (mail.mail_from, mail.rcpt_tos) == ("zoë@example.com", ("jürgen@example.org",))
    assert mail.data == message
    assert mail.message()["Subject"] == "¡hola!"


def test_the_producer_guides_raw_example_is_a_valid_job(repo_root: Path) -> None:
    guide = (repo_root / "producer_examples" / "README.md").read_text()
    blocks = re.findall(r"^```json\n(.*?)^```$", guide, re.MULTILINE | re.DOTALL)
    [example] = [json.loads(b) for b in blocks if '"raw_b64"' in b]
    parsed_job, job_id = parse_job(encode(example), None)
    assert (job_id, parsed_job.subject_line()) == ("invoice-42", "Your invoice")
    assert parsed_job.sender_addresses() == ["bounces@shop.example", "orders@shop.example"]


async def test_a_sendmail_outbox_gets_the_raw_bytes_with_local_line_ends(sendmail: Path) -> None:
    outbox = Outbox("local", "", 0, transport="sendmail", command=str(sendmail), timeout=10)
    mail = raw_mail(parsed(DATED + HEAD + b"\r\n" + BODY), "x", datetime.now(UTC), limit=10_000)
    await SendmailPipe(outbox, 1).send(mail, "bounces@example.com", ["ann@example.org"])
    [accepted] = spooled(sendmail)
    assert accepted["argv"] == ["-i", "-f", "bounces@example.com", "--", "ann@example.org"]
    assert str(accepted["data"]).encode() == (DATED + HEAD + b"\r\n" + BODY).replace(b"\r\n", b"\n")
