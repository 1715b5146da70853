"""Bounces and complaints: each mail's return address (VERP) at the bounce domain, the
reports read from what comes back (DSN, ARF, non-standard bounces), and the bounce
listener end to end: a worker sends through the capture server, a DSN and a complaint
come back over SMTP to the return addresses it used, and the job's record, the
suppressions and the events say so.
"""

from __future__ import annotations

import asyncio
import base64
import json
import smtplib
from collections.abc import Callable
from typing import Any

import pytest
from aio_pika.abc import AbstractChannel
from prometheus_client import generate_latest
from pydantic import SecretStr

from consumer.amqp.publish import publish_job
from consumer.cli.status import render
from consumer.clock import utcnow
from consumer.core.event_contract import EVENTS, MailBounced, MailComplained
from consumer.core.names import Names
from consumer.core.outboxes import outbox_from_url
from consumer.core.outcomes import Later, Sent
from consumer.core.reports import Bounce, Complaint, UnreadableReportError, read_report
from consumer.core.returns import JobRef, ReturnPaths, carried_whole, search_key
from consumer.core.vocabulary import FeedbackTally
from consumer.errors import ConfigurationError
from consumer.service.alerts import digest_job
from consumer.service.gateway import check_bounces
from consumer.service.metrics import Metrics
from consumer.service.picker import Choice
from consumer.service.status import gather
from consumer.settings import Settings
from consumer.store.domains import hash_key
from consumer.store.jobs import JobStore
from consumer.store.mongo import Mongo
from consumer.store.suppressions import SuppressionStore
from consumer.vault import Vault, new_key
from deploy.devstack.smtp_capture import CaptureServer
from tests import bounce_samples as samples
from tests.broker import drain_events, encode, job, listen_events, until
from tests.conftest import RunningWorker, cli, settled_record
from tests.doubles import AuthorizerDouble, PickerDouble, Rig, SenderDouble, offline_settings
from tests.secret_watch import watched
from tests.serving import ANY_PORT, gateways

BOUNCES = "bounces.shop.example"
OWN = "bounces.brand.example"  # brand.example's own bounce domain
KEYS = [b"k" * 32]
RCPT = "gone@receiver.example"

# Return addresses.


def test_a_short_id_is_carried_whole_and_read_back_in_any_case() -> None:
    paths = ReturnPaths(BOUNCES, KEYS)
    address = paths.address("Order-42/ß")
    local, _, domain = address.partition("@")
    assert domain == BOUNCES
    assert local == local.lower()
    assert len(local) <= 64
    for seen in (address, address.upper(), f"<{address}>"):
        ref = paths.read(seen)
        assert ref is not None
        assert ref.job_id == "Order-42/ß"


def test_a_long_id_is_carried_as_the_search_key_of_its_record() -> None:
    paths = ReturnPaths(BOUNCES, KEYS)
    long_id = "campaign:" + "x" * 190
    assert not carried_whole(long_id)
    address = paths.address(long_id)
    assert len(address.partition("@")[0]) <= 64
    ref = paths.read(address)
    assert ref is not None
    assert ref.job_id is None
    assert ref.key == search_key(long_id)
    assert search_key("short") is None


def test_the_longest_id_carried_whole_fills_the_local_part_exactly() -> None:
    address = ReturnPaths(BOUNCES, KEYS).address("é" * 13 + "x")  # 27 UTF-8 bytes
    assert len(address.partition("@")[0]) == 64


def _flip_mac(address: str) -> str:
    local, _, domain = address.partition("@")
    head, mac = local.rsplit("-", 1)
    return f"{head}-{'b' if mac[0] == 'a' else 'a'}{mac[1:]}@{domain}"


def _other_job(address: str) -> str:
    """The same MAC on another job's id."""
    local, _, domain = address.partition("@")
    kind, _, mac = local.split("-")
    return f"{kind}-{ReturnPaths(BOUNCES, KEYS).address('order-2').split('-')[1]}-{mac}@{domain}"


@pytest.mark.parametrize(
    "forge",
    [
        lambda a: a.replace("@" + BOUNCES, "@elsewhere.example"),
        _flip_mac,
        _other_job,
        lambda a: "postmaster@" + BOUNCES,
        lambda a: "bi--@" + BOUNCES,
        lambda a: "x" * 300 + "@" + BOUNCES,
        lambda a: "bi-aa-\u00e9" + "@" + BOUNCES,
    ],
)
def test_forged_and_foreign_return_addresses_are_refused(forge: Callable[[str], str]) -> None:
    paths = ReturnPaths(BOUNCES, KEYS)
    assert paths.read(forge(paths.address("order-1"))) is None


def test_an_address_at_a_domains_own_bounce_domain_is_valid_there_alone() -> None:
    paths = ReturnPaths(BOUNCES, KEYS)
    own = paths.address("order-1", at="Bounces.Brand.example")
    local, _, domain = own.partition("@")
    assert domain == OWN
    assert paths.read(own.upper()) == paths.read(own) == JobRef(job_id="order-1")
    default = paths.address("order-1")
    assert paths.address("order-1", at=BOUNCES) == default
    # The MAC covers the domain: moved to MAILBUS_BOUNCE_DOMAIN or to another tenant's
    # bounce domain, an address is a forgery; so is the default one moved to OWN.
    for moved in (
        f"{local}@{BOUNCES}",
        f"{local}@bounces.other.example",
        default[: -len(BOUNCES)] + OWN,
    ):
        assert paths.read(moved) is None
    # Without MAILBUS_BOUNCE_DOMAIN, only the domains' own bounce domains.
    alone = ReturnPaths(None, KEYS)
    assert alone.read(own) == JobRef(job_id="order-1")
    assert alone.read(default) is None
    with pytest.raises(ValueError, match="no bounce domain"):
        alone.address("order-1")


def test_a_rotated_key_still_reads_the_addresses_of_mail_sent_before() -> None:
    old = ReturnPaths(BOUNCES, [b"o" * 32]).address("order-1")
    assert ReturnPaths(BOUNCES, [b"n" * 32, b"o" * 32]).read(old) is not None
    assert ReturnPaths(BOUNCES, [b"n" * 32]).read(old) is None


def test_a_bounce_domain_without_a_secret_key_fails_at_start() -> None:
    assert ReturnPaths.configured(offline_settings()) is None
    with pytest.raises(ConfigurationError, match="MAILBUS_SECRET_KEY"):
        ReturnPaths.configured(offline_settings(bounce_domain=BOUNCES))
    keyed = offline_settings(bounce_domain=BOUNCES, secret_key=new_key())
    paths = ReturnPaths.configured(keyed)
    assert paths is not None
    assert paths.domain == BOUNCES
    # Its own key: never the one that seals the workers' copies.
    assert paths.keys[0] not in Vault.from_settings(keyed).derived_keys("signing")
    # Domains' own bounce domains need the key alone, the listener too.
    unset = offline_settings(secret_key=new_key())
    only_own = ReturnPaths.configured(unset)
    assert only_own is not None
    assert only_own.domain is None
    assert check_bounces(unset, bounces=ANY_PORT) is not None
    with pytest.raises(ConfigurationError, match="--bounces needs MAILBUS_SECRET_KEY"):
        check_bounces(offline_settings(), bounces=ANY_PORT)


RAW = b"From: Sender <sender@example.com>\r\nTo: rcpt@example.org\r\nSubject: Raw\r\n\r\nHi\r\n"


@pytest.mark.parametrize(
    "body",
    [
        job(id="order-7"),
        {
            "id": "order-7",
            "domain": "example.com",
            "raw_b64": base64.b64encode(RAW).decode(),
            "mail_from": "sender@example.com",
            "rcpt_to": ["rcpt@example.org"],
        },
    ],
    ids=["built", "raw"],
)
async def test_the_envelope_sender_is_the_return_address_and_the_from_is_untouched(
    body: dict[str, Any],
) -> None:
    rig = Rig()
    rig.pipeline.returns = paths = ReturnPaths(BOUNCES, KEYS)
    outcome = await rig.process(encode(body), "order-7")
    assert isinstance(outcome, Sent)
    [handed] = rig.sender.handed
    assert handed.sender == paths.address("order-7")
    assert b"\r\nFrom: Sender <sender@example.com>\r\n" in b"\r\n" + handed.mail.wire


async def test_a_domain_with_its_own_bounce_domain_sends_with_its_return_address_there() -> None:
    own = {"_id": "example.com", "bounce_domain": OWN}
    rig = Rig(authorizer=AuthorizerDouble(registration=own))
    # No MAILBUS_BOUNCE_DOMAIN: the domain's own is enough.
    rig.pipeline.returns = paths = ReturnPaths(None, KEYS)
    assert isinstance(await rig.process(encode(job(id="order-7")), "order-7"), Sent)
    open_rig = Rig()
    open_rig.pipeline.returns = paths
    assert isinstance(await open_rig.process(encode(job(id="order-8")), "order-8"), Sent)
    assert [h.sender for h in rig.sender.handed + open_rig.sender.handed] == [
        paths.address("order-7", OWN),
        "sender@example.com",  # a domain without: its own sender, as before
    ]
    # A worker without MAILBUS_SECRET_KEY cannot sign it: retried, saying why, never sent.
    unkeyed = Rig(authorizer=AuthorizerDouble(registration=own))
    outcome = await unkeyed.process(encode(job(id="order-9")), "order-9")
    assert isinstance(outcome, Later)
    assert outcome.failure is not None
    assert "MAILBUS_SECRET_KEY" in outcome.failure.describe()
    assert unkeyed.sender.handed == []


async def test_sandboxed_mail_keeps_the_jobs_own_envelope_sender() -> None:
    catch_all = SenderDouble(outbox_from_url("smtp://127.0.0.1:1025", name="catch-all"))
    rig = Rig(
        settings=offline_settings(sandbox_outbox="catch-all"),
        picker=PickerDouble(sandbox_choice=Choice(catch_all)),
    )
    rig.pipeline.returns = ReturnPaths(BOUNCES, KEYS)
    await rig.process(encode(job(sandbox=True)))
    assert [h.sender for h in catch_all.handed] == ["sender@example.com"]


def test_the_metrics_and_the_digest_say_what_came_back() -> None:
    metrics = Metrics(lambda: 0, dict, dict)
    metrics.watch_feedback(lambda: {"hard": 3, "soft": 2, "complaints": 1})
    scraped = generate_latest(metrics.registry).decode()
    assert 'mailbus_feedback_last_day{kind="hard"} 3.0' in scraped
    assert 'mailbus_feedback_last_day{kind="complaints"} 1.0' in scraped
    counts: dict[FeedbackTally, int] = {"hard": 3, "soft": 2, "complaints": 1}
    digest = digest_job([], 0, "admin@example.net", "alerts@example.net", utcnow(), counts)
    assert "3 hard bounce(s), 2 soft, 1 complaint(s)" in digest["text"]


# Reports.


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            samples.postfix_dsn,
            Bounce(
                RCPT,
                "hard",
                "5.1.1",
                "550 5.1.1 <Gone@Receiver.example>: Recipient address rejected: User unknown",
            ),
        ),
        (
            samples.delayed_dsn,
            Bounce(RCPT, "soft", "4.4.1", "connect to mx.receiver.example: Connection timed out"),
        ),
        (samples.exim_bounce, Bounce(RCPT, "hard", None, None)),
        (samples.qmail_bounce, Bounce(RCPT, "hard", None, None)),
    ],
)
def test_bounces_are_read(make: Callable[[str, str], bytes], expected: Bounce) -> None:
    report = read_report(make("bi-x-y@" + BOUNCES, "Gone@Receiver.example"))
    assert report.bounces == (expected,)
    assert report.complaint is None


def test_a_gmail_dsn_keeps_its_folded_diagnostic_on_one_bounded_line() -> None:
    [bounce] = read_report(samples.gmail_dsn("r@" + BOUNCES, RCPT)).bounces
    assert (bounce.kind, bounce.status) == ("hard", "5.1.1")
    assert bounce.diagnostic is not None
    assert len(bounce.diagnostic) <= 300
    assert bounce.diagnostic.startswith("550-5.1.1 The email account that you tried to reach")
    assert "\n" not in bounce.diagnostic


@pytest.mark.parametrize("rcpt_field", [True, False])
def test_a_complaint_names_its_recipient_by_its_field_or_the_original_to(rcpt_field: bool) -> None:
    sample = samples.arf_complaint("r@" + BOUNCES, RCPT, rcpt_field=rcpt_field)
    assert read_report(sample).complaint == Complaint(RCPT, "abuse")


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (samples.report_without_status("r@" + BOUNCES), "recipient block"),
        (samples.mime_bomb("r@" + BOUNCES), "MIME parts"),
        (samples.plain_mail("r@" + BOUNCES), "no delivery status"),
        (b"\xff\xfe\x00 not a message", "known bounce|malformed"),
        (b"", "malformed|known bounce"),
    ],
)
def test_what_is_no_report_is_unreadable_with_a_reason(message: bytes, why: str) -> None:
    with pytest.raises(UnreadableReportError, match=why):
        read_report(message)


# The listener, end to end.


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """A bounce domain, and the secret key its return addresses are signed with."""
    return settings.model_copy(
        update={"secret_key": SecretStr(watched(new_key())), "bounce_domain": BOUNCES}
    )


def _submit(port: int, rcpt: str, message: bytes) -> tuple[int, bytes]:
    """Deliver ``message`` to ``rcpt`` as a remote MTA would: null sender, over SMTP."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as session:
        session.ehlo("mx.receiver.example")
        session.mail("<>")
        code, said = session.rcpt(rcpt)
        if code != 250:
            return code, said
        return session.data(message)


def _probe(port: int, rcpt: str, tries: int) -> list[int]:
    """RCPT after RCPT of addresses that are no return address, until the listener ends
    the session: the codes answered.
    """
    codes: list[int] = []
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as session:
        session.ehlo("prober.example")
        session.mail("<>")
        try:
            for n in range(tries):
                codes.append(session.rcpt(f"{n}{rcpt}")[0])
        except smtplib.SMTPServerDisconnected:
            pass
    return codes


async def test_a_bounce_and_a_complaint_come_back_to_the_jobs_that_sent_the_mail(
    settings: Settings,
    channel: AbstractChannel,
    store: JobStore,
    smtp: CaptureServer,
    worker: RunningWorker,
) -> None:
    names = Names(settings.prefix)
    events = await listen_events(channel, names)
    long_id = "newsletter-2026-12/" + "n" * 100
    sender = {"email": "news@shop.example", "name": "Shop"}
    await publish_job(
        channel,
        job(id="order-1", domain="shop.example", **{"from": sender}, to=[RCPT]),
        names=names,
    )
    await publish_job(
        channel,
        job(id=long_id, domain="shop.example", **{"from": sender}, to=["fan@receiver.example"]),
        names=names,
    )
    async with asyncio.timeout(20):
        received = await smtp.wait_for(2)
    by_rcpt = {mail.rcpt_tos[0]: mail for mail in received}
    returned, complained = by_rcpt[RCPT].mail_from, by_rcpt["fan@receiver.example"].mail_from
    assert returned.endswith("@" + BOUNCES)
    assert complained.endswith("@" + BOUNCES)
    assert by_rcpt[RCPT].message()["From"] == "Shop <news@shop.example>"
    await settled_record(store, "order-1")
    await settled_record(store, long_id)

    dsn = samples.postfix_dsn(returned, RCPT)
    async with gateways(settings, bounces=ANY_PORT) as ports:
        port = ports["bounces"]
        forged = returned.replace("bi-", "bi-a", 1)
        assert (await asyncio.to_thread(_submit, port, forged, dsn))[0] == 550
        assert (await asyncio.to_thread(_submit, port, returned, dsn))[0] == 250
        again = await asyncio.to_thread(_submit, port, returned, dsn)  # its 250 was lost
        assert again[0] == 250
        arf = samples.arf_complaint(complained, "fan@receiver.example")
        assert (await asyncio.to_thread(_submit, port, complained.upper(), arf))[0] == 250
        probed = await asyncio.to_thread(_probe, port, returned, 30)
        assert probed == [550] * 19 + [421]
        dropped = await asyncio.to_thread(_submit, port, returned, samples.plain_mail(returned))
        assert dropped[0] == 250
        assert b"dropped" in dropped[1]

    record = await store.get("order-1")
    assert record is not None
    [entry] = record["feedback"]
    assert (entry["kind"], entry["recipient"], entry["status"]) == ("hard", RCPT, "5.1.1")
    long_record = await store.get(long_id)
    assert long_record is not None
    assert [(e["kind"], e["feedback_type"]) for e in long_record["feedback"]] == [
        ("complaint", "abuse")
    ]
    suppressions = {
        (doc["address"], doc["source"]): doc
        for doc in await SuppressionStore(store.database).find(domain="shop.example")
    }
    assert suppressions[(RCPT, "bounce")]["expire_at"] is not None
    assert suppressions[("fan@receiver.example", "complaint")]["expire_at"] is None
    status = await gather(settings, utcnow())
    assert status["today"]["feedback"] == {"hard": 1, "soft": 0, "complaints": 1}
    assert "came back: 1 hard bounces, 0 soft, 1 complaints" in render(status)

    seen: list[tuple[str, Any]] = []

    async def both() -> bool:
        seen.extend(await drain_events(channel, events))
        return {"mail.bounced", "mail.complained"} <= {key for key, _ in seen}

    await until(both, 10)
    feedback = [
        EVENTS.validate_python(body)
        for key, body in seen
        if key in ("mail.bounced", "mail.complained")
    ]
    bounced = [e for e in feedback if isinstance(e, MailBounced)]
    assert {(e.id, e.recipient, e.kind, e.status) for e in bounced} == {
        ("order-1", RCPT, "hard", "5.1.1")
    }
    [complaint] = [e for e in feedback if isinstance(e, MailComplained)]
    assert (complaint.id, complaint.recipient, complaint.feedback_type) == (
        long_id,
        "fan@receiver.example",
        "abuse",
    )

    # The next mail of the domain to that recipient is held back; another domain's goes.
    smtp.reset()
    await publish_job(
        channel,
        job(id="order-2", domain="shop.example", **{"from": sender}, to=[RCPT]),
        names=names,
    )
    other = {"email": "hello@other.example", "name": "Other"}
    await publish_job(
        channel,
        job(id="other-1", domain="other.example", **{"from": other}, to=[RCPT]),
        names=names,
    )
    assert (await settled_record(store, "order-2"))["reason"] == "suppressed"
    assert (await settled_record(store, "other-1"))["status"] == "sent"


BRAND_KEY = watched("dk-brand-bounces-5150")


async def test_a_domains_own_bounce_domain_takes_its_bounces_and_no_other_domains(
    settings: Settings,
    channel: AbstractChannel,
    store: JobStore,
    smtp: CaptureServer,
    worker: RunningWorker,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with Mongo.connect(settings) as mongo:
        assert await mongo.domains.put("brand.example", hash_key(BRAND_KEY), [], replace=False)
    said = await cli(settings, capsys, "domain", "bounce-domain", "Brand.example", OWN.upper())
    assert OWN in said
    assert (
        json.loads(await cli(settings, capsys, "domain", "show", "brand.example"))["bounce_domain"]
        == OWN
    )
    assert (await cli(settings, capsys, "domain", "ls")).splitlines()[1].split()[-1] == OWN

    sender = {"email": "news@brand.example", "name": "Brand"}
    brand = job(id="brand-1", domain="brand.example", domain_key=BRAND_KEY, to=[RCPT])
    await publish_job(channel, brand | {"from": sender}, names=Names(settings.prefix))
    async with asyncio.timeout(20):
        [sent] = await smtp.wait_for(1)
    returned = sent.mail_from
    assert returned.endswith("@" + OWN)
    await settled_record(store, "brand-1")

    dsn = samples.postfix_dsn(returned, RCPT)
    local = returned.partition("@")[0]
    async with gateways(settings, bounces=ANY_PORT) as ports:
        port = ports["bounces"]
        # At MAILBUS_BOUNCE_DOMAIN, or at another tenant's bounce domain: refused at RCPT.
        for moved in (f"{local}@{BOUNCES}", f"{local}@bounces.other.example"):
            assert (await asyncio.to_thread(_submit, port, moved, dsn))[0] == 550
        assert (await asyncio.to_thread(_submit, port, returned, dsn))[0] == 250

    record = await store.get("brand-1")
    assert record is not None
    assert [(e["kind"], e["recipient"]) for e in record["feedback"]] == [("hard", RCPT)]
    async with Mongo.connect(settings) as mongo:
        held = await mongo.suppressions.find(domain="brand.example")
    assert [(doc["address"], doc["source"]) for doc in held] == [(RCPT, "bounce")]

    await cli(settings, capsys, "domain", "bounce-domain", "brand.example", "--clear")
    shown = json.loads(await cli(settings, capsys, "domain", "show", "brand.example"))
    assert shown["bounce_domain"] is None
    for wrong in (["brand.example"], ["brand.example", OWN, "--clear"], ["brand.example", "x"]):
        with pytest.raises(ConfigurationError):
            await cli(settings, capsys, "domain", "bounce-domain", *wrong)
    unkeyed = settings.model_copy(update={"secret_key": None, "bounce_domain": None})
    with pytest.raises(ConfigurationError, match="MAILBUS_SECRET_KEY"):
        await cli(unkeyed, capsys, "domain", "bounce-domain", "brand.example", OWN)
