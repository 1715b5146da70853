"""Pure policy functions: failure classification, backoff, due times, outbox URLs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import aiosmtplib
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.core.headers import DUE_HEADER
from consumer.core.message import Job
from consumer.core.outboxes import outbox_from_url
from consumer.core.refusals import InvalidJobError
from consumer.core.retry import compute_backoff, decide, split_refusals, unknown_recipients
from consumer.core.schedule import due_time, to_epoch_ms
from consumer.errors import AttachmentUnavailableError, ConfigurationError
from consumer.mail.failures import classify
from consumer.settings import redact_url
from tests.broker import job


@pytest.mark.parametrize(
    ("exc", "transient", "code"),
    [
        (aiosmtplib.SMTPResponseException(451, "later"), True, 451),
        (aiosmtplib.SMTPResponseException(421, "closing"), True, 421),
        (aiosmtplib.SMTPDataError(554, "rejected"), False, 554),
        (aiosmtplib.SMTPSenderRefused(553, "bad sender", "a@b.c"), False, 553),
        (aiosmtplib.SMTPAuthenticationError(535, "bad credentials"), True, 535),
        (aiosmtplib.SMTPServerDisconnected("gone"), True, None),
        (aiosmtplib.SMTPConnectError("refused"), True, None),
        (aiosmtplib.SMTPReadTimeoutError("slow"), True, None),
        (ConnectionRefusedError(), True, None),
        (TimeoutError(), True, None),
        (aiosmtplib.SMTPNotSupported("no SMTPUTF8"), False, None),
        (AttachmentUnavailableError("https://x.example/a.pdf: HTTP 404"), True, None),
        (
            aiosmtplib.SMTPRecipientsRefused(
                [
                    aiosmtplib.SMTPRecipientRefused(550, "unknown", "a@b.c"),
                    aiosmtplib.SMTPRecipientRefused(452, "full", "d@b.c"),
                ]
            ),
            True,
            452,
        ),
        (
            aiosmtplib.SMTPRecipientsRefused(
                [aiosmtplib.SMTPRecipientRefused(550, "unknown", "a@b.c")]
            ),
            False,
            550,
        ),
    ],
)
def test_classify(exc: BaseException, transient: bool, code: int | None) -> None:
    failure = classify(exc)
    assert (failure.transient, failure.code) == (transient, code)


def test_unknown_recipients_by_enhanced_status_code() -> None:
    refused = {
        "gone@x.org": (550, "5.1.1 <gone@x.org>: Recipient address rejected: User unknown"),
        "nodomain@y.org": (550, "5.1.2 Host unknown"),
        "moved@x.org": (551, "5.1.6 mailbox has moved"),
        "nullmx@z.org": (556, "5.1.10 Recipient address has null MX"),
        "spam@x.org": (550, "5.7.1 Message rejected as spam"),
        "full@x.org": (552, "5.2.2 Mailbox full"),
        "later@x.org": (450, "4.1.1 try later"),
        "plain@x.org": (550, "No such user here"),  # no enhanced code: not judged by prose
    }
    unknown = unknown_recipients(refused)
    assert sorted(unknown) == ["gone@x.org", "moved@x.org", "nodomain@y.org", "nullmx@z.org"]
    assert unknown["gone@x.org"].startswith("550 5.1.1")


def test_every_refusal_is_kept_when_all_recipients_are_refused() -> None:
    exc = aiosmtplib.SMTPRecipientsRefused(
        [
            aiosmtplib.SMTPRecipientRefused(550, "5.1.1 unknown", "a@b.c"),
            aiosmtplib.SMTPRecipientRefused(550, "5.7.1 policy", "d@b.c"),
        ]
    )
    assert classify(exc).refusals == {
        "a@b.c": (550, "5.1.1 unknown"),
        "d@b.c": (550, "5.7.1 policy"),
    }


def test_classify_ignores_reply_text() -> None:
    # A 5xx that *says* "try again" is still permanent: the code decides, not the text.
    assert not classify(aiosmtplib.SMTPDataError(550, "temporary, try again later")).transient


@given(st.integers(1, 200), st.floats(0.01, 100), st.floats(0, 0.999))
def test_backoff_is_bounded_and_at_least_half(attempt: int, base: float, jitter: float) -> None:
    maximum = 3600.0
    delay = compute_backoff(attempt, base, maximum, jitter)
    full = min(maximum, base * 2 ** (attempt - 1))
    assert full / 2 - 1e-9 <= delay <= full + 1e-9


def test_backoff_doubles() -> None:
    assert [compute_backoff(n, 30, 3600, 0.999999) for n in (1, 2, 3)] == pytest.approx(
        [30, 60, 120], rel=1e-5
    )
    assert compute_backoff(20, 30, 3600, 0) == 1800


def test_decide() -> None:
    transient = classify(aiosmtplib.SMTPResponseException(451, "x"))
    permanent = classify(aiosmtplib.SMTPResponseException(550, "x"))
    assert decide(permanent, 1, 8, 30, 3600, 0).reason == "permanent"
    assert decide(transient, 8, 8, 30, 3600, 0).reason == "attempts_exhausted"
    assert decide(transient, 2, 8, 30, 3600, 0).retry_in == 30


def test_due_time_sources() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    plain = Job.model_validate(job())
    at = Job.model_validate(job(send_at="2030-01-01T01:00:00+01:00"))
    assert due_time(plain, {}, now) is None
    assert due_time(plain, {"x-delay": 90000}, now) == now + timedelta(seconds=90)
    assert due_time(plain, {"x-delay": b"1500"}, now) == now + timedelta(milliseconds=1500)
    assert due_time(plain, {"x-delay": 0}, now) is None
    assert due_time(at, {}, now) == now
    absolute = now + timedelta(hours=5)
    # The worker's absolute due header wins over the relative x-delay it replaced.
    assert due_time(at, {DUE_HEADER: to_epoch_ms(absolute), "x-delay": 1}, now) == absolute
    for bad in ("soon", -1, 2**28 * 1000):
        with pytest.raises(InvalidJobError):
            due_time(plain, {"x-delay": bad}, now)
    # A due time no date can hold, or past any schedule, is the producer's mistake.
    for far in (10**17, to_epoch_ms(datetime(3000, 1, 1, tzinfo=UTC))):
        with pytest.raises(InvalidJobError, match="later than 3000"):
            due_time(plain, {DUE_HEADER: far}, now)


def test_outbox_urls() -> None:
    box = outbox_from_url("smtp://us%40er:p%3Ass@mail.example.com:2525?security=none")
    assert (box.host, box.port, box.security, box.username) == (
        "mail.example.com",
        2525,
        "none",
        "us@er",
    )
    assert box.password is not None
    assert box.password.get_secret_value() == "p:ss"
    assert "p:ss" not in repr(box)
    assert outbox_from_url("smtp://mail.example.com").security == "starttls"
    assert outbox_from_url("smtp://mail.example.com").port == 587
    assert outbox_from_url("smtps://mail.example.com").security == "tls"
    assert outbox_from_url("smtp://h:465").security == "tls"
    assert outbox_from_url("smtp://h?verify=false").verify_tls is False
    for bad in ("http://h", "smtp://", "smtp://h?security=ssl", "smtp://h?verify=maybe"):
        with pytest.raises(ConfigurationError):
            outbox_from_url(bad)


def test_redact_url() -> None:
    assert redact_url("amqp://u:secret@h:5672/v") == "amqp://u:***@h:5672/v"
    assert redact_url("mongodb://h:27017/") == "mongodb://h:27017/"
    assert (
        redact_url("mongodb://u:p@h1:27017,h2:27017/?replicaSet=rs0")
        == "mongodb://u:***@h1:27017,h2:27017/?replicaSet=rs0"
    )
    assert (
        redact_url("mongodb://h/?tls=true&tlsCertificateKeyFilePassword=kp&authSource")
        == "mongodb://h/?tls=true&tlsCertificateKeyFilePassword=***&authSource"
    )
    assert (
        redact_url("amqps://u:p:q@h:5671/?cafile=/etc/ca.pem")
        == "amqps://u:***@h:5671/?cafile=/etc/ca.pem"
    )


def test_split_refusals_by_code_class() -> None:
    refused = {
        "busy@example.org": (452, "4.2.2 mailbox full"),
        "gone@example.org": (550, "5.1.1 user unknown"),
        "odd@example.org": (421, "4.7.0 closing"),
    }
    final, later = split_refusals(refused)
    assert final == {"gone@example.org": (550, "5.1.1 user unknown")}
    assert set(later) == {"busy@example.org", "odd@example.org"}
    assert split_refusals({}) == ({}, {})
