"""Every branch of the pipeline, from the bytes of a delivery to its outcome and the
records it wrote, run on in-process doubles (tests/doubles.py): no server, milliseconds.

Parsing, MIME building, the retry policy and failure classification are the real ones.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from datetime import timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

import consumer
from consumer.core.content import Content
from consumer.core.headers import DELAY_HEADER, DUE_HEADER
from consumer.core.leases import Release
from consumer.core.mime import Mail, build_mail
from consumer.core.outboxes import outbox_from_url
from consumer.core.outcomes import Crashed, Dead, Later, Outcome, SendResult, Sent, Skip
from consumer.core.ratelimit import Reservation
from consumer.core.refusals import AttachmentError, DeadLetterError, TemplateError
from consumer.core.replies import ReplyRule, parse_rules
from consumer.core.schedule import CLAIM_AHEAD, to_epoch_ms
from consumer.core.suppression import Scope
from consumer.errors import AttachmentUnavailableError, ConfigurationError
from consumer.service import pipeline as pipeline_module
from consumer.service.authorization import Authority
from consumer.service.picker import Choice, Throttle
from consumer.store.jobs import Claim, ClaimState
from tests.broker import encode, job
from tests.doubles import (
    NOW,
    STORE_NOW,
    WORKER,
    AuthorizerDouble,
    ComposerDouble,
    PickerDouble,
    Rig,
    SenderDouble,
    StoreDouble,
    SuppressionsDouble,
    claimed,
    offline_settings,
    unavailable,
)

BODY = encode(job())
SENT_REPLY = {"code": 250, "message": "2.0.0 Ok: queued"}
# The first retry's wait with no jitter: half of MAILBUS_RETRY_BASE_DELAY (30 s).
FIRST_RETRY = NOW + timedelta(seconds=15)


def refused(code: int, text: str, recipient: str) -> aiosmtplib.SMTPRecipientRefused:
    return aiosmtplib.SMTPRecipientRefused(code, text, recipient)


def only_send(rig: Rig) -> list[str]:
    """The recipients of the one hand-over to the SMTP server."""
    assert len(rig.sender.handed) == 1, rig.sender.handed
    return rig.sender.handed[0].recipients


def test_the_pipeline_under_test_is_this_checkout() -> None:
    """The venv's editable install may point at another worktree: PYTHONPATH must win."""
    checkout = Path(__file__).resolve().parents[1]
    assert consumer.__file__ is not None
    assert Path(consumer.__file__).resolve().is_relative_to(checkout)


# Before any claim: parse, authorize, schedule, expire.


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        encode(job(to=[])),
        encode({k: v for k, v in job().items() if k != "from"}),
        encode(job(subject="Hi\r\nBcc: everyone@example.org")),
    ],
    ids=["not-json", "not-an-object", "no-recipient", "no-from", "header-injection"],
)
async def test_an_invalid_body_is_dead_and_nothing_is_recorded(body: bytes) -> None:
    rig = Rig()
    outcome = await rig.process(body, message_id="m-7")
    assert isinstance(outcome, Dead)
    assert outcome.reason == "invalid"
    assert outcome.ctx.job_id == "m-7"
    assert rig.store.calls == []
    assert rig.authorizer.asked == []
    assert rig.sender.handed == []


async def test_a_body_over_the_job_limit_is_dead_too_large_before_it_is_read() -> None:
    rig = Rig(settings=offline_settings(max_job_bytes=1024))
    outcome = await rig.process(encode(job(text="x" * 2000)))
    assert isinstance(outcome, Dead)
    assert outcome.reason == "too_large"
    assert rig.store.calls == []


async def test_a_bad_delay_header_is_invalid() -> None:
    rig = Rig()
    outcome = await rig.process(BODY, headers={DELAY_HEADER: "soon"})
    assert isinstance(outcome, Dead)
    assert outcome.reason == "invalid"
    assert rig.store.calls == []


async def test_an_unauthorized_job_is_dead_and_never_claimed() -> None:
    rig = Rig(authorizer=AuthorizerDouble("wrong domain key for example.com"))
    outcome = await rig.process(BODY, authority=Authority(user="producer"))
    assert isinstance(outcome, Dead)
    assert outcome.reason == "unauthorized"
    assert outcome.error == "wrong domain key for example.com"
    assert outcome.ctx.job_id == "job-1"
    assert not outcome.ctx.authorized
    assert rig.authorizer.asked == [("example.com", Authority(user="producer"))]
    assert rig.store.calls == []
    assert rig.composer.composed == 0
    assert rig.sender.handed == []


async def test_mongodb_away_while_authorizing_comes_round_again() -> None:
    rig = Rig(authorizer=AuthorizerDouble(error=unavailable()))
    outcome = await rig.process(BODY)
    assert isinstance(outcome, Later)
    assert (outcome.why, outcome.due_at, outcome.release) == (
        "store",
        NOW + timedelta(seconds=5),
        None,
    )
    assert rig.store.calls == []


async def test_a_job_id_in_the_body_wins_over_the_message_id() -> None:
    rig = Rig()
    outcome = await rig.process(encode(job(id="order-42")), message_id="random")
    assert isinstance(outcome, Sent)
    assert outcome.ctx.job_id == "order-42"
    assert rig.store.called("claim")["job_id"] == "order-42"


async def test_a_job_due_later_is_scheduled() -> None:
    send_at = NOW + timedelta(hours=2)
    rig = Rig()
    body = encode(job(send_at=send_at.isoformat()))
    outcome = await rig.process(body)
    assert isinstance(outcome, Later)
    assert (outcome.why, outcome.due_at) == ("scheduled", send_at)
    assert outcome.ctx.authorized
    assert rig.store.names == ["schedule"]
    scheduled = rig.store.called("schedule")
    assert (scheduled["job_id"], scheduled["due_at"], scheduled["body"]) == ("job-1", send_at, body)
    assert rig.sender.handed == []


async def test_a_delay_header_schedules_from_now() -> None:
    rig = Rig()
    outcome = await rig.process(BODY, headers={DELAY_HEADER: 60_000})
    assert isinstance(outcome, Later)
    assert (outcome.why, outcome.due_at) == ("scheduled", NOW + timedelta(minutes=1))
    assert rig.store.called("schedule")["due_at"] == NOW + timedelta(minutes=1)


async def test_a_zero_delay_sends_now() -> None:
    rig = Rig()
    outcome = await rig.process(BODY, headers={DELAY_HEADER: 0})
    assert isinstance(outcome, Sent)
    assert rig.store.names == ["claim", "mark_sent"]


async def test_a_job_due_within_the_tolerance_is_sent_now() -> None:
    rig = Rig()
    due = NOW + timedelta(milliseconds=3)
    outcome = await rig.process(encode(job(send_at=due.isoformat())))
    assert isinstance(outcome, Sent)
    assert rig.store.names == ["claim", "mark_sent"]


async def test_a_held_job_is_claimed_ahead_and_handed_over_at_its_time() -> None:
    rig = Rig()
    due = NOW + timedelta(milliseconds=300)
    headers = {DUE_HEADER: to_epoch_ms(due)}
    sending = asyncio.ensure_future(rig.pipeline.process(BODY, "job-1", headers, claim_ahead=True))
    await asyncio.sleep(0.1)
    # Claimed (its record exists: the copy carries its due time) and waiting for its time.
    claim = rig.store.called("claim")
    assert (claim["recorded"], claim["ahead"]) == (True, True)
    assert rig.sender.handed == []
    outcome = await sending
    assert isinstance(outcome, Sent)
    [handed] = rig.sender.handed
    assert parsedate_to_datetime(handed.mail.message["Date"]) == due.replace(microsecond=0)


@pytest.mark.parametrize("ahead", [False, True])
async def test_a_held_job_not_yet_within_its_claim_ahead_waits(ahead: bool) -> None:
    rig = Rig()
    due = NOW + (CLAIM_AHEAD * 2 if ahead else timedelta(milliseconds=300))
    outcome = await rig.pipeline.process(
        BODY, "job-1", {DUE_HEADER: to_epoch_ms(due)}, claim_ahead=ahead
    )
    assert isinstance(outcome, Later)
    assert (outcome.why, outcome.due_at) == ("waiting", due)
    assert rig.store.names == []


async def test_scheduling_a_job_whose_record_is_final_skips_it() -> None:
    rig = Rig(store=StoreDouble(schedule=Claim(ClaimState.DONE, "cancelled", 0)))
    outcome = await rig.process(encode(job(send_at=(NOW + timedelta(hours=1)).isoformat())))
    assert isinstance(outcome, Skip)
    assert outcome.status == "cancelled"
    assert outcome.why == "already cancelled"
    assert rig.store.names == ["schedule"]


async def test_a_job_scheduled_while_mongodb_is_away_still_waits_for_its_time() -> None:
    due = NOW + timedelta(hours=1)
    rig = Rig(store=StoreDouble(failing={"schedule": 1}))
    outcome = await rig.process(encode(job(send_at=due.isoformat())))
    assert isinstance(outcome, Later)
    assert (outcome.why, outcome.due_at, outcome.release) == ("scheduled", due, None)


async def test_a_copy_back_early_waits_again_without_a_record() -> None:
    due = NOW + timedelta(minutes=5)
    rig = Rig()
    outcome = await rig.process(BODY, headers={DUE_HEADER: to_epoch_ms(due)})
    assert isinstance(outcome, Later)
    assert (outcome.why, outcome.due_at) == ("waiting", due)
    assert rig.store.calls == []


async def test_a_copy_on_time_claims_its_existing_record() -> None:
    rig = Rig()
    release = Release("worker-0", NOW - timedelta(seconds=3))
    authority = Authority(domain="example.com", release=release)
    outcome = await rig.process(BODY, headers={DUE_HEADER: to_epoch_ms(NOW)}, authority=authority)
    assert isinstance(outcome, Sent)
    claim = rig.store.called("claim")
    assert claim["recorded"] is True
    assert claim["release"] == release
    assert claim["worker_id"] == WORKER


async def test_an_expired_job_is_recorded_dead_and_never_claimed() -> None:
    rig = Rig()
    outcome = await rig.process(encode(job(expires_at=(NOW - timedelta(minutes=1)).isoformat())))
    assert isinstance(outcome, Dead)
    assert outcome.reason == "expired"
    assert outcome.error.startswith("expired at 2030-01-01T11:59:00")
    assert rig.store.names == ["record_dead"]
    record = rig.store.called("record_dead")
    assert (record["job_id"], record["domain"], record["reason"]) == (
        "job-1",
        "example.com",
        "expired",
    )
    assert rig.sender.handed == []


async def test_an_expired_copy_of_a_sent_job_is_skipped() -> None:
    rig = Rig(store=StoreDouble(record_dead=Claim(ClaimState.DONE, "sent", 1)))
    outcome = await rig.process(encode(job(expires_at=NOW.isoformat())))
    assert isinstance(outcome, Skip)
    assert outcome.status == "sent"


# The claim.


@pytest.mark.parametrize(
    ("claim", "kind", "detail"),
    [
        (
            Claim(ClaimState.LEASED, "sending", 1, lease_until=NOW + timedelta(seconds=20)),
            Later,
            ("leased", NOW + timedelta(seconds=20)),
        ),
        (
            Claim(ClaimState.WAITING, "scheduled", 1, due_at=NOW + timedelta(minutes=3)),
            Later,
            ("waiting", NOW + timedelta(minutes=3)),
        ),
        (Claim(ClaimState.DONE, "sent", 1), Skip, "sent"),
        (Claim(ClaimState.DONE, "failed", 3), Skip, "failed"),
        (Claim(ClaimState.DONE, "dead", 1), Skip, "dead"),
        (Claim(ClaimState.DONE, "cancelled", 0), Skip, "cancelled"),
        (Claim(ClaimState.CONFLICT, "sent", 1), Dead, "conflict"),
        (Claim(ClaimState.EXHAUSTED, "dead", 5), Dead, "delivery_limit"),
    ],
    ids=[
        "leased",
        "waiting",
        "done-sent",
        "done-failed",
        "done-dead",
        "done-cancelled",
        "conflict",
        "exhausted",
    ],
)
async def test_a_job_not_claimed_follows_its_record(
    claim: Claim, kind: type[Outcome], detail: Any
) -> None:
    rig = Rig(store=StoreDouble(claim=claim))
    outcome = await rig.process(BODY)
    assert isinstance(outcome, kind)
    match outcome:
        case Later():
            assert (outcome.why, outcome.due_at) == detail
        case Skip():
            assert outcome.status == detail
        case Dead():
            assert outcome.reason == detail
    assert rig.store.names == ["claim"]  # nothing more written
    assert rig.composer.composed == 0
    assert rig.sender.handed == []


async def test_a_job_past_its_last_attempt_reports_its_attempts() -> None:
    rig = Rig(store=StoreDouble(claim=Claim(ClaimState.EXHAUSTED, "dead", 5)))
    outcome = await rig.process(BODY)
    assert isinstance(outcome, Dead)
    assert outcome.ctx.attempts == 5
    assert outcome.error.startswith("5 attempts made")


async def test_another_domains_job_id_is_not_named() -> None:
    rig = Rig(store=StoreDouble(claim=Claim(ClaimState.CONFLICT, "sent", 1)))
    outcome = await rig.process(BODY)
    assert isinstance(outcome, Dead)
    assert outcome.error == "job id job-1 is taken by another domain's job"


@pytest.mark.parametrize(
    "claim",
    [
        Claim(ClaimState.DONE, "sending", 1),  # "done" yet not final
        Claim(ClaimState.LEASED, "sending", 1),  # leased, without a lease
        Claim(ClaimState.WAITING, "scheduled", 1),  # waiting, without a due time
        Claim(ClaimState.SCHEDULED, "scheduled", 0),  # only schedule() says this
    ],
    ids=["done-sending", "leased-no-lease", "waiting-no-due", "scheduled"],
)
async def test_a_record_no_claim_leaves_is_a_crash(claim: Claim) -> None:
    rig = Rig(store=StoreDouble(claim=claim))
    outcome = await rig.process(BODY)
    assert isinstance(outcome, Crashed)
    assert outcome.error.startswith("unexpected job record")
    assert rig.sender.handed == []


async def test_mongodb_away_at_the_claim_lets_go_of_the_lease() -> None:
    rig = Rig(store=StoreDouble(failing={"claim": 1}))
    outcome = await rig.process(BODY)
    assert isinstance(outcome, Later)
    assert outcome.why == "store"
    assert outcome.due_at == NOW + timedelta(seconds=5)
    # On the store's clock, the one that stamps the record.
    assert outcome.release == Release(WORKER, STORE_NOW)
    assert rig.sender.handed == []
    assert rig.pipeline.leases_held() == frozenset()


async def test_mongodb_away_after_a_failed_send_lets_go_of_the_lease() -> None:
    sender = SenderDouble(replies=[aiosmtplib.SMTPResponseException(451, "later")])
    rig = Rig(store=StoreDouble(failing={"mark_retry": 1}), sender=sender)
    outcome = await rig.process(BODY)
    assert isinstance(outcome, Later)
    assert outcome.why == "store"
    assert outcome.release == Release(WORKER, STORE_NOW)
    assert rig.pipeline.leases_held() == frozenset()


async def test_a_duplicate_delivery_never_lets_go_of_the_senders_lease() -> None:
    """While this worker sends a job, a second delivery of it that finds MongoDB away
    comes round again without a release: the lease is the first delivery's.
    """
    gate = asyncio.Event()
    rig = Rig(sender=SenderDouble(gate=gate))
    first = asyncio.create_task(rig.process(BODY))
    await rig.sender.started.wait()
    assert rig.pipeline.leases_held() == frozenset({"job-1"})
    rig.store.failing["claim"] = 1
    second = await rig.process(BODY)
    assert isinstance(second, Later)
    assert (second.why, second.release) == ("store", None)
    assert rig.pipeline.leases_held() == frozenset({"job-1"})
    gate.set()
    assert isinstance(await first, Sent)
    assert rig.pipeline.leases_held() == frozenset()
    assert len(rig.sender.handed) == 1


# Recipients and content.


async def test_a_job_whose_every_recipient_is_suppressed_is_dead_without_a_send() -> None:
    body = encode(job(to=["A@example.org"], cc=["b@example.org"]))
    rig = Rig(suppressions=SuppressionsDouble(["a@example.org", "B@example.org"]))
    outcome = await rig.process(body)
    assert isinstance(outcome, Dead)
    assert outcome.reason == "suppressed"
    assert outcome.error == "every recipient is suppressed: a@example.org, b@example.org"
    assert rig.store.names == ["claim", "mark_failed"]
    record = rig.store.called("mark_failed")
    assert (record["status"], record["reason"]) == ("dead", "suppressed")
    assert record["details"] == {"suppressed": ["a@example.org", "b@example.org"]}
    assert rig.composer.composed == 0
    assert rig.sender.handed == []


async def test_suppressed_recipients_are_left_out_of_the_envelope_only() -> None:
    body = encode(
        job(to=["a@example.org", "Bob@Example.org"], cc=["c@example.org"], bcc=["d@example.org"])
    )
    rig = Rig(suppressions=SuppressionsDouble(["bob@example.org", "d@example.org"]))
    outcome = await rig.process(body)
    assert isinstance(outcome, Sent)
    assert outcome.suppressed == ("bob@example.org", "d@example.org")
    assert only_send(rig) == ["a@example.org", "c@example.org"]
    assert "bob@example.org" in rig.sender.handed[0].mail.message["To"].lower()  # headers unchanged
    details = rig.store.called("mark_sent")["details"]
    assert details == {"suppressed": ["bob@example.org", "d@example.org"]}


@pytest.mark.parametrize(
    "error",
    [
        TemplateError("no template named 'welcome'"),
        AttachmentError("attachment path /etc/passwd is outside MAILBUS_ATTACHMENT_DIRS"),
    ],
    ids=["template", "attachment"],
)
async def test_content_that_can_never_be_gathered_is_dead(error: DeadLetterError) -> None:
    rig = Rig(composer=ComposerDouble(error=error))
    outcome = await rig.process(BODY)
    assert isinstance(outcome, Dead)
    assert (outcome.reason, outcome.error) == (error.reason, str(error))
    record = rig.store.called("mark_failed")
    assert (record["status"], record["reason"], record["error"]) == (
        "dead",
        error.reason,
        str(error),
    )
    assert rig.picker is not None
    assert rig.picker.chosen == []
    assert rig.sender.handed == []


async def test_an_attachment_unavailable_now_is_retried() -> None:
    rig = Rig(composer=ComposerDouble(error=AttachmentUnavailableError("HTTP 503")))
    outcome = await rig.process(BODY)
    assert isinstance(outcome, Later)
    assert (outcome.why, outcome.due_at) == ("retry", FIRST_RETRY)
    assert outcome.failure is not None
    assert outcome.failure.transient
    assert outcome.failure.message == "attachment unavailable: HTTP 503"
    assert rig.store.names == ["claim", "mark_retry"]
    retry = rig.store.called("mark_retry")
    assert (retry["due_at"], retry["body"], retry["partial"]) == (FIRST_RETRY, BODY, None)
    assert rig.sender.handed == []


async def test_a_template_is_recorded_with_the_sent_mail() -> None:
    content = Content("Welcome", "Hi Ann", None, (), ("welcome", 3))
    rig = Rig(composer=ComposerDouble(content))
    templated = {k: v for k, v in job().items() if k != "text"} | {"template": {"name": "welcome"}}
    outcome = await rig.process(encode(templated))
    assert isinstance(outcome, Sent)
    assert outcome.ctx.template == ("welcome", 3)
    assert rig.store.called("mark_sent")["details"] == {
        "template": {"name": "welcome", "version": 3}
    }
    assert rig.sender.handed[0].mail.message["Subject"] == "Welcome"


# The outbox.


async def test_no_outbox_is_dead() -> None:
    rig = Rig(picker=PickerDouble(None))
    outcome = await rig.process(BODY)
    assert isinstance(outcome, Dead)
    assert outcome.reason == "no_outbox"
    assert "example.com" in outcome.error
    record = rig.store.called("mark_failed")
    assert (record["status"], record["reason"], record["outbox"]) == ("dead", "no_outbox", None)


async def test_an_outbox_configuration_error_is_retried() -> None:
    rig = Rig(picker=PickerDouble(ConfigurationError("outbox o1: its password cannot be read")))
    outcome = await rig.process(BODY)
    assert isinstance(outcome, Later)
    assert (outcome.why, outcome.due_at) == ("retry", FIRST_RETRY)
    retry = rig.store.called("mark_retry")
    assert retry["error"] == "outbox o1: its password cannot be read"
    assert retry["outbox"] is None
    assert rig.sender.handed == []


async def test_an_outbox_configuration_error_at_the_last_attempt_is_exhausted() -> None:
    rig = Rig(
        store=StoreDouble(claim=claimed(3)),
        picker=PickerDouble(ConfigurationError("outbox o1: bad")),
    )
    outcome = await rig.process(BODY)
    assert isinstance(outcome, Dead)
    assert outcome.reason == "attempts_exhausted"
    record = rig.store.called("mark_failed")
    assert (record["status"], record["reason"]) == ("failed", "attempts_exhausted")


RESERVATION = Reservation("o1", "mailgun", 1_893_499_200_000_000)


@pytest.mark.parametrize(
    ("held", "why"),
    [(None, "rate_limited"), (RESERVATION, "waiting")],
    ids=["first-queued", "queued-again"],
)
async def test_a_throttled_job_waits_with_its_attempt_given_back(
    held: Reservation | None, why: str
) -> None:
    until = NOW + timedelta(seconds=42)
    sender = SenderDouble()
    throttled = Choice(sender, Throttle(RESERVATION, until))
    picker = PickerDouble(throttled, reserved_choice=throttled)
    rig = Rig(store=StoreDouble(claim=claimed(2, reserved=held)), sender=sender, picker=picker)
    outcome = await rig.process(BODY)
    assert isinstance(outcome, Later)
    assert (outcome.why, outcome.due_at) == (why, until)
    assert outcome.ctx.attempts == 1  # claimed at 2, given back
    assert outcome.ctx.outbox == "o1"
    assert rig.store.names == ["claim", "mark_throttled"]
    record = rig.store.called("mark_throttled")
    assert (record["reservation"], record["due_at"], record["body"]) == (RESERVATION, until, BODY)
    assert sender.handed == []


async def test_a_queued_job_sends_through_the_outbox_it_queued_for() -> None:
    reserved = SenderDouble(outbox_from_url("smtp://127.0.0.1:2526", name="o2"))
    picker = PickerDouble(None, reserved_choice=Choice(reserved))
    rig = Rig(store=StoreDouble(claim=claimed(2, reserved=RESERVATION)), picker=picker)
    outcome = await rig.process(BODY)
    assert isinstance(outcome, Sent)
    assert outcome.ctx.outbox == "o2"
    assert picker.asked_reserved == [RESERVATION]
    assert picker.chosen == []
    assert len(reserved.handed) == 1
    assert rig.store.called("mark_sent")["outbox"] == "o2"


async def test_a_queued_job_whose_outbox_is_gone_chooses_afresh_avoiding_the_last() -> None:
    claim = claimed(2, reserved=RESERVATION, last_outbox="o0")
    rig = Rig(store=StoreDouble(claim=claim))
    outcome = await rig.process(BODY)
    assert isinstance(outcome, Sent)
    assert rig.picker is not None
    assert rig.picker.asked_reserved == [RESERVATION]
    assert rig.picker.chosen == [("example.com", "o0")]


# The message.


@pytest.mark.parametrize(
    ("outbox_charset", "builds_expected"),
    [(None, ["utf-8"]), ("utf-8", ["utf-8"]), ("iso-8859-1", ["utf-8", "iso-8859-1"])],
)
async def test_the_message_is_built_before_the_outbox_and_again_only_for_its_charset(
    monkeypatch: pytest.MonkeyPatch, outbox_charset: str | None, builds_expected: list[str]
) -> None:
    """Built before an outbox is chosen (a message that can never go takes no token), and
    built again only when the chosen outbox asks for a charset of its own.
    """
    builds: list[str] = []

    def counted(*args: Any, **kwargs: Any) -> Mail:
        builds.append(kwargs["charset"])
        return build_mail(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "build_mail", counted)
    outbox = dataclasses.replace(
        outbox_from_url("smtp://127.0.0.1:2525", name="o1"), charset=outbox_charset
    )
    rig = Rig(sender=SenderDouble(outbox))
    body = encode(job(to=["a@example.org", "b@example.org"], text="Grüße aus Köln"))
    outcome = await rig.process(body)
    assert isinstance(outcome, Sent)
    assert builds == builds_expected
    mail = rig.sender.handed[0].mail
    assert mail.message.get_content_charset() == builds_expected[-1]
    assert mail.message.get_content().rstrip("\n") == "Grüße aus Köln"
    assert f'charset="{builds_expected[-1]}"'.encode() in mail.wire
    assert rig.sender.handed[0].sender == "sender@example.com"


async def test_the_jobs_charset_wins_over_the_outboxs() -> None:
    outbox = dataclasses.replace(outbox_from_url("smtp://127.0.0.1:2525"), charset="iso-8859-1")
    rig = Rig(sender=SenderDouble(outbox))
    outcome = await rig.process(encode(job(charset="utf-8", text="Grüße")))
    assert isinstance(outcome, Sent)
    assert rig.sender.handed[0].mail.message.get_content_charset() == "utf-8"


async def test_without_a_charset_anywhere_the_message_is_utf8() -> None:
    rig = Rig()
    outcome = await rig.process(encode(job(text="Grüße")))
    assert isinstance(outcome, Sent)
    assert rig.sender.handed[0].mail.message.get_content_charset() == "utf-8"


async def test_a_body_the_outboxs_charset_cannot_write_is_dead() -> None:
    outbox = dataclasses.replace(outbox_from_url("smtp://127.0.0.1:2525"), charset="us-ascii")
    rig = Rig(sender=SenderDouble(outbox))
    outcome = await rig.process(encode(job(text="Grüße")))
    assert isinstance(outcome, Dead)
    assert outcome.reason == "invalid"
    assert rig.store.called("mark_failed")["status"] == "dead"
    assert rig.sender.handed == []


async def test_a_message_over_the_size_limit_is_dead_too_large() -> None:
    rig = Rig(settings=offline_settings(max_message_bytes=1024))
    outcome = await rig.process(encode(job(text="x " * 2000)))
    assert isinstance(outcome, Dead)
    assert outcome.reason == "too_large"
    record = rig.store.called("mark_failed")
    assert (record["status"], record["reason"], record["outbox"]) == ("dead", "too_large", None)
    assert rig.sender.handed == []
    assert rig.picker is not None
    assert rig.picker.chosen == []  # no outbox turn and no token for a message that never goes


# The hand-over and its record.


async def test_an_accepted_mail_is_recorded_sent() -> None:
    body = encode(job(to=["a@example.org"], cc=["b@example.org"], bcc=["c@example.org"]))
    rig = Rig()
    outcome = await rig.process(body)
    assert isinstance(outcome, Sent)
    assert outcome.result == SendResult(250, "2.0.0 Ok: queued", {})
    assert outcome.suppressed == ()
    assert (outcome.ctx.attempts, outcome.ctx.outbox, outcome.ctx.authorized) == (1, "o1", True)
    assert only_send(rig) == ["a@example.org", "b@example.org", "c@example.org"]
    assert "Bcc" not in rig.sender.handed[0].mail.message
    assert rig.store.names == ["claim", "mark_sent"]
    record = rig.store.called("mark_sent")
    assert (record["worker_id"], record["reply"], record["refused"], record["outbox"]) == (
        WORKER,
        SENT_REPLY,
        {},
        "o1",
    )
    assert rig.suppressions.added == []
    assert rig.pipeline.leases_held() == frozenset()


async def test_a_sent_record_lost_with_the_lease_is_still_sent() -> None:
    rig = Rig()
    rig.store.sent_accepted = False
    outcome = await rig.process(BODY)
    assert isinstance(outcome, Sent)


async def test_the_sent_record_is_written_whatever_it_takes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The mail is out: the record that keeps it from going out again waits for MongoDB."""
    pauses: list[float] = []
    real_sleep = asyncio.sleep

    async def no_wait(seconds: float) -> None:
        pauses.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", no_wait)  # the backoff of the record writes
    rig = Rig(store=StoreDouble(failing={"mark_sent": 3}))
    outcome = await rig.process(BODY)
    monkeypatch.undo()
    assert isinstance(outcome, Sent)
    assert rig.store.names == ["claim"] + ["mark_sent"] * 4
    assert pauses == [0.5, 1.0, 2.0]
    assert len(rig.sender.handed) == 1


async def test_a_permanent_refusal_is_recorded_failed() -> None:
    sender = SenderDouble(replies=[aiosmtplib.SMTPResponseException(550, "no such user")])
    rig = Rig(sender=sender)
    outcome = await rig.process(BODY)
    assert isinstance(outcome, Dead)
    assert (outcome.reason, outcome.error, outcome.code) == ("permanent", "550 no such user", 550)
    assert rig.store.names == ["claim", "mark_failed"]
    record = rig.store.called("mark_failed")
    assert (record["status"], record["reason"], record["error"], record["outbox"]) == (
        "failed",
        "permanent",
        "550 no such user",
        "o1",
    )
    assert rig.suppressions.added == []  # no enhanced status: not called unknown


@pytest.mark.parametrize(
    ("attempt", "wait"),
    [(1, 15), (2, 30), (4, 120)],
)
async def test_a_transient_refusal_with_attempts_left_is_retried(attempt: int, wait: int) -> None:
    sender = SenderDouble(replies=[aiosmtplib.SMTPResponseException(451, "later")])
    rig = Rig(store=StoreDouble(claim=claimed(attempt), limit=8), sender=sender)
    outcome = await rig.process(BODY)
    assert isinstance(outcome, Later)
    due = NOW + timedelta(seconds=wait)
    assert (outcome.why, outcome.due_at, outcome.ctx.attempts) == ("retry", due, attempt)
    assert outcome.failure is not None
    assert (outcome.failure.code, outcome.failure.transient) == (451, True)
    assert rig.store.names == ["claim", "mark_retry"]
    retry = rig.store.called("mark_retry")
    assert (retry["error"], retry["due_at"], retry["outbox"], retry["partial"]) == (
        "451 later",
        due,
        "o1",
        None,
    )
    assert retry["body"] == BODY


async def test_a_transient_refusal_at_the_last_attempt_is_exhausted() -> None:
    sender = SenderDouble(replies=[aiosmtplib.SMTPResponseException(451, "later")])
    rig = Rig(store=StoreDouble(claim=claimed(3), limit=3), sender=sender)
    outcome = await rig.process(BODY)
    assert isinstance(outcome, Dead)
    assert (outcome.reason, outcome.error, outcome.code) == ("attempts_exhausted", "451 later", 451)
    record = rig.store.called("mark_failed")
    assert (record["status"], record["reason"]) == ("failed", "attempts_exhausted")


async def test_the_jobs_own_attempt_limit_wins() -> None:
    sender = SenderDouble(replies=[aiosmtplib.SMTPResponseException(451, "later")])
    rig = Rig(store=StoreDouble(claim=claimed(1), limit=8), sender=sender)
    outcome = await rig.process(encode(job(max_attempts=1)))
    assert isinstance(outcome, Dead)
    assert outcome.reason == "attempts_exhausted"


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "Connection refused"),
        OSError("network unreachable"),
        TimeoutError(),
        aiosmtplib.SMTPServerDisconnected("gone"),
        aiosmtplib.SMTPAuthenticationError(535, "bad credentials"),
    ],
    ids=["refused", "oserror", "timeout", "disconnected", "auth"],
)
async def test_a_network_or_outbox_failure_is_retried(error: Exception) -> None:
    rig = Rig(sender=SenderDouble(replies=[error]))
    outcome = await rig.process(BODY)
    assert isinstance(outcome, Later)
    assert (outcome.why, outcome.due_at) == ("retry", FIRST_RETRY)
    assert rig.store.names == ["claim", "mark_retry"]


async def test_an_unexpected_send_error_is_permanent() -> None:
    rig = Rig(sender=SenderDouble(replies=[RuntimeError("a bug in a pool")]))
    outcome = await rig.process(BODY)
    assert isinstance(outcome, Dead)
    assert (outcome.reason, outcome.error) == ("permanent", "RuntimeError: a bug in a pool")


async def test_every_recipient_unknown_is_failed_and_suppressed() -> None:
    error = aiosmtplib.SMTPRecipientsRefused(
        [
            refused(550, "5.1.1 no such user", "a@example.org"),
            refused(550, "5.7.1 relaying denied", "b@example.org"),
        ]
    )
    body = encode(job(to=["a@example.org", "b@example.org"]))
    rig = Rig(sender=SenderDouble(replies=[error]))
    outcome = await rig.process(body)
    assert isinstance(outcome, Dead)
    assert (outcome.reason, outcome.code) == ("permanent", 550)
    assert outcome.error == "550 <a@example.org> 5.1.1 no such user"
    assert rig.store.called("mark_failed")["status"] == "failed"
    # Only the unknown one: a policy refusal says nothing of the address.
    assert rig.suppressions.added == [
        ({"a@example.org": "550 5.1.1 no such user"}, Scope("example.com"), "bounce", 30.0)
    ]


async def test_recipients_refused_some_for_now_are_retried_and_the_unknown_suppressed() -> None:
    error = aiosmtplib.SMTPRecipientsRefused(
        [
            refused(550, "5.1.1 no such user", "a@example.org"),
            refused(452, "4.2.2 mailbox full", "b@example.org"),
        ]
    )
    rig = Rig(sender=SenderDouble(replies=[error]))
    outcome = await rig.process(encode(job(to=["a@example.org", "b@example.org"])))
    assert isinstance(outcome, Later)
    assert (outcome.why, outcome.due_at) == ("retry", FIRST_RETRY)
    assert rig.store.called("mark_retry")["error"] == "452 <b@example.org> 4.2.2 mailbox full"
    assert rig.suppressions.added == [
        ({"a@example.org": "550 5.1.1 no such user"}, Scope("example.com"), "bounce", 30.0)
    ]


async def test_a_refusal_while_others_accept_is_recorded_with_the_sent_mail() -> None:
    reply = SendResult(
        250,
        "2.0.0 Ok",
        {
            "b@example.org": (550, "5.1.1 no such user"),
            "c@example.org": (554, "5.7.1 spam"),
        },
    )
    body = encode(job(to=["a@example.org", "b@example.org", "c@example.org"]))
    rig = Rig(sender=SenderDouble(replies=[reply]))
    outcome = await rig.process(body)
    assert isinstance(outcome, Sent)
    assert outcome.result.refused == reply.refused
    assert rig.store.called("mark_sent")["refused"] == {
        "b@example.org": {"code": 550, "message": "5.1.1 no such user"},
        "c@example.org": {"code": 554, "message": "5.7.1 spam"},
    }
    assert rig.suppressions.added == [
        ({"b@example.org": "550 5.1.1 no such user"}, Scope("example.com"), "bounce", 30.0)
    ]


async def test_no_bounce_is_suppressed_when_bounce_suppression_is_off() -> None:
    reply = SendResult(250, "2.0.0 Ok", {"b@example.org": (550, "5.1.1 no such user")})
    rig = Rig(
        sender=SenderDouble(replies=[reply]),
        settings=offline_settings(bounce_suppression_days=0),
    )
    outcome = await rig.process(encode(job(to=["a@example.org", "b@example.org"])))
    assert isinstance(outcome, Sent)
    assert rig.suppressions.added == []


async def test_a_bounce_not_suppressed_for_mongodb_being_away_loses_no_mail() -> None:
    reply = SendResult(250, "2.0.0 Ok", {"b@example.org": (550, "5.1.1 no such user")})
    rig = Rig(
        sender=SenderDouble(replies=[reply]),
        suppressions=SuppressionsDouble(failing=True),
    )
    outcome = await rig.process(encode(job(to=["a@example.org", "b@example.org"])))
    assert isinstance(outcome, Sent)
    assert len(rig.suppressions.added) == 1
    assert rig.store.names == ["claim", "mark_sent"]


PARTIAL = SendResult(
    250,
    "2.0.0 Ok",
    {
        "b@example.org": (451, "4.3.0 try later"),
        "c@example.org": (550, "5.1.1 no such user"),
    },
)
THREE = encode(job(to=["a@example.org", "b@example.org", "c@example.org"]))


async def test_a_partial_delivery_retries_the_deferred_recipients_only() -> None:
    rig = Rig(sender=SenderDouble(replies=[PARTIAL]))
    outcome = await rig.process(THREE)
    assert isinstance(outcome, Later)
    assert (outcome.why, outcome.due_at) == ("retry", FIRST_RETRY)
    assert outcome.failure is not None
    assert (outcome.failure.code, outcome.failure.transient) == (451, True)
    assert rig.store.names == ["claim", "mark_retry"]
    retry = rig.store.called("mark_retry")
    assert retry["error"] == "451 <b@example.org> 4.3.0 try later"
    assert retry["partial"] == (
        ["b@example.org"],
        {"c@example.org": {"code": 550, "message": "5.1.1 no such user"}},
    )


async def test_a_partial_delivery_suppresses_the_unknown_recipient() -> None:
    rig = Rig(sender=SenderDouble(replies=[PARTIAL]))
    outcome = await rig.process(THREE)
    assert isinstance(outcome, Later)
    assert rig.suppressions.added == [
        ({"c@example.org": "550 5.1.1 no such user"}, Scope("example.com"), "bounce", 30.0)
    ]


async def test_the_attempt_after_a_partial_delivery_goes_to_the_pending_only() -> None:
    earlier = {"c@example.org": {"code": 550, "message": "5.1.1 no such user"}}
    claim = claimed(2, pending=("b@example.org",), refused=earlier, last_outbox="o1")
    rig = Rig(store=StoreDouble(claim=claim))
    outcome = await rig.process(THREE)
    assert isinstance(outcome, Sent)
    assert only_send(rig) == ["b@example.org"]
    assert rig.picker is not None
    assert rig.picker.chosen == [("example.com", "o1")]
    assert rig.store.called("mark_sent")["refused"] == earlier
    assert outcome.result.refused == {"c@example.org": (550, "5.1.1 no such user")}


@pytest.mark.parametrize(
    ("attempt", "code", "text"),
    [(2, 550, "5.1.1 no such user"), (3, 451, "4.3.0 try later")],
    ids=["refused-for-good", "deferred-at-the-last-attempt"],
)
async def test_a_retry_after_a_partial_delivery_refused_for_everyone_left_is_sent(
    attempt: int, code: int, text: str
) -> None:
    earlier = {"c@example.org": {"code": 550, "message": "5.1.1 no such user"}}
    claim = claimed(attempt, pending=("b@example.org",), refused=earlier)
    error = aiosmtplib.SMTPRecipientsRefused([refused(code, text, "b@example.org")])
    rig = Rig(store=StoreDouble(claim=claim), sender=SenderDouble(replies=[error]))
    outcome = await rig.process(THREE)
    assert isinstance(outcome, Sent)
    assert rig.store.names == ["claim", "mark_sent"]
    assert rig.store.called("mark_sent")["refused"] == {
        **earlier,
        "b@example.org": {"code": code, "message": text},
    }


async def test_a_partial_deliverys_retry_deferred_for_everyone_left_keeps_them_pending() -> None:
    earlier = {"c@example.org": {"code": 550, "message": "5.1.1 no such user"}}
    claim = claimed(2, pending=("b@example.org",), refused=earlier)
    error = aiosmtplib.SMTPRecipientsRefused([refused(451, "4.3.0 try later", "b@example.org")])
    rig = Rig(store=StoreDouble(claim=claim), sender=SenderDouble(replies=[error]))
    outcome = await rig.process(THREE)
    assert isinstance(outcome, Later)
    assert outcome.why == "retry"
    assert rig.store.called("mark_retry")["partial"] == (["b@example.org"], earlier)


async def test_a_second_partial_delivery_keeps_the_earlier_refusals() -> None:
    earlier = {"c@example.org": {"code": 550, "message": "5.1.1 no such user"}}
    claim = claimed(2, pending=("a@example.org", "b@example.org"), refused=earlier)
    reply = SendResult(250, "2.0.0 Ok", {"b@example.org": (451, "4.3.0 try later")})
    rig = Rig(store=StoreDouble(claim=claim), sender=SenderDouble(replies=[reply]))
    outcome = await rig.process(THREE)
    assert isinstance(outcome, Later)
    assert outcome.due_at == NOW + timedelta(seconds=30)
    assert only_send(rig) == ["a@example.org", "b@example.org"]
    assert rig.store.called("mark_retry")["partial"] == (["b@example.org"], earlier)


async def test_a_partial_delivery_at_the_last_attempt_is_sent_with_every_refusal() -> None:
    rig = Rig(store=StoreDouble(claim=claimed(3)), sender=SenderDouble(replies=[PARTIAL]))
    outcome = await rig.process(THREE)
    assert isinstance(outcome, Sent)
    assert outcome.result.refused == PARTIAL.refused
    assert rig.store.names == ["claim", "mark_sent"]
    assert rig.store.called("mark_sent")["refused"] == {
        "b@example.org": {"code": 451, "message": "4.3.0 try later"},
        "c@example.org": {"code": 550, "message": "5.1.1 no such user"},
    }
    assert rig.suppressions.added == [
        ({"c@example.org": "550 5.1.1 no such user"}, Scope("example.com"), "bounce", 30.0)
    ]


async def test_a_partial_delivery_record_waits_for_mongodb(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Some recipients have the mail: the deferral is written whatever it takes, never
    let go of with a release.
    """

    async def no_wait(seconds: float) -> None:
        pass

    monkeypatch.setattr(asyncio, "sleep", no_wait)  # the backoff of the record writes
    rig = Rig(store=StoreDouble(failing={"mark_retry": 2}), sender=SenderDouble(replies=[PARTIAL]))
    outcome = await rig.process(THREE)
    monkeypatch.undo()
    assert isinstance(outcome, Later)
    assert (outcome.why, outcome.release) == ("retry", None)
    assert rig.store.names == ["claim", "mark_retry", "mark_retry", "mark_retry"]


# What the records keep of the body.


async def test_records_never_keep_the_domain_key_once_it_can_be_sealed() -> None:
    body = encode(job(domain_key="dk-secret-123"))
    sender = SenderDouble(replies=[aiosmtplib.SMTPResponseException(421, "busy")])
    rig = Rig(sender=sender, settings=offline_settings(secret_key="k" * 44))
    outcome = await rig.process(body)
    assert isinstance(outcome, Later)
    kept = rig.store.called("mark_retry")["body"]
    assert b"dk-secret-123" not in kept
    assert "domain_key" not in json.loads(kept)
    assert json.loads(kept)["to"] == ["rcpt@example.org"]


async def test_without_a_secret_key_the_body_is_kept_as_it_came() -> None:
    body = encode(job(domain_key="dk-secret-123"))
    rig = Rig(sender=SenderDouble(replies=[aiosmtplib.SMTPResponseException(421, "busy")]))
    await rig.process(body)
    assert rig.store.called("mark_retry")["body"] == body


async def test_a_scheduled_record_never_keeps_the_domain_key_once_it_can_be_sealed() -> None:
    body = encode(job(domain_key="dk-secret-123", send_at=(NOW + timedelta(days=1)).isoformat()))
    rig = Rig(settings=offline_settings(secret_key="k" * 44))
    outcome = await rig.process(body)
    assert isinstance(outcome, Later)
    assert b"dk-secret-123" not in rig.store.called("schedule")["body"]


# Replies judged under the provider's rules; throttling replies slow the provider.

PROVIDER_OUTBOX = dataclasses.replace(outbox_from_url("smtp://127.0.0.1:2525"), provider="p")


def provider_rig(*replies: SendResult | Exception, rules: str = "", **settings: Any) -> Rig:
    """A rig whose outbox belongs to provider ``p``, whose reply rules are ``rules``."""
    sender = SenderDouble(PROVIDER_OUTBOX, replies=replies)
    picker = PickerDouble(Choice(sender))
    picker.rules["p"] = parse_rules([rules] if rules else [])
    return Rig(sender=sender, picker=picker, settings=offline_settings(**settings))


@pytest.mark.parametrize(
    ("rules", "retried"),
    [
        ("transient: 550 5.7.1 rate limited", True),
        ("transient: 550 5.7.1 spam", False),
        ("", False),
    ],
)
async def test_a_providers_rule_makes_a_refusal_transient(rules: str, retried: bool) -> None:
    refusal = aiosmtplib.SMTPDataError(550, "5.7.1 Rate limited, try later")
    rig = provider_rig(refusal, rules=rules)
    outcome = await rig.process(BODY)
    assert isinstance(outcome, Later if retried else Dead)
    assert rig.picker is not None
    assert rig.picker.slowed == []


@pytest.mark.parametrize(
    ("reply", "rules"),
    [
        (aiosmtplib.SMTPResponseException(421, "4.7.0 slow down"), ""),
        (aiosmtplib.SMTPDataError(451, "4.7.1 too many messages"), ""),
        (aiosmtplib.SMTPDataError(550, "5.7.1 quota exceeded"), "throttle: 5.7 quota"),
        (
            aiosmtplib.SMTPRecipientsRefused([refused(450, "4.7.1 later", "rcpt@example.org")]),
            "",
        ),
    ],
)
async def test_a_throttling_reply_slows_the_provider(reply: Exception, rules: str) -> None:
    rig = provider_rig(reply, rules=rules)
    outcome = await rig.process(BODY)
    assert isinstance(outcome, Later)
    assert outcome.failure is not None
    assert outcome.failure.throttle
    assert rig.picker is not None
    assert rig.picker.slowed == [("p", 300.0)]
    assert rig.store.names == ["claim", "mark_retry"]  # the retry waits for the slowed bucket


async def test_a_recipient_throttled_while_others_accept_slows_the_provider() -> None:
    reply = SendResult(250, "2.0.0 Ok", {"b@example.org": (450, "4.7.1 too fast")})
    rig = provider_rig(reply)
    outcome = await rig.process(THREE)
    assert isinstance(outcome, Later)
    assert rig.store.called("mark_retry")["partial"][0] == ["b@example.org"]
    assert rig.picker is not None
    assert rig.picker.slowed == [("p", 300.0)]


async def test_no_provider_is_slowed_when_throttling_is_off() -> None:
    rig = provider_rig(aiosmtplib.SMTPResponseException(421, "4.7.0 slow down"), throttle_seconds=0)
    outcome = await rig.process(BODY)
    assert isinstance(outcome, Later)
    assert rig.picker is not None
    assert rig.picker.slowed == []


async def test_rules_that_cannot_be_read_leave_the_codes_to_decide() -> None:
    class Unreadable(PickerDouble):
        async def reply_rules(self, provider: str) -> tuple[ReplyRule, ...]:
            raise unavailable()

    sender = SenderDouble(PROVIDER_OUTBOX, replies=[aiosmtplib.SMTPDataError(451, "4.3.0 busy")])
    rig = Rig(sender=sender, picker=Unreadable(Choice(sender)))
    outcome = await rig.process(BODY)
    assert isinstance(outcome, Later)
    assert rig.store.names == ["claim", "mark_retry"]
