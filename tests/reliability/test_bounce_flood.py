"""A flood at the bounce listener: 200 messages over 8 concurrent connections, mixing
genuine reports for jobs a worker sent (hard, soft, complaints, from five kinds of MTA),
forged return addresses, oversized messages, malformed ones and reports naming someone
the job never wrote to. Then the genuine ones are sent again, as an MTA whose 250 was
lost does.

The account: each genuine report recorded on its job exactly once, with one event and,
for a hard bounce or a complaint, one suppression; each forged return refused at RCPT;
each oversized one refused; each malformed or misdirected one answered 250 and dropped;
the listener still answering after it all.
"""

from __future__ import annotations

import asyncio
import smtplib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from aio_pika.abc import AbstractChannel
from pydantic import SecretStr

from consumer.amqp.publish import publish_job
from consumer.core.names import Names
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from consumer.store.suppressions import SuppressionStore
from consumer.vault import new_key
from deploy.devstack.smtp_capture import CaptureServer
from tests import bounce_samples as samples
from tests.broker import drain_events, job, listen_events, until
from tests.conftest import RunningWorker, settled_record
from tests.reliability.accounts import Account
from tests.secret_watch import watched
from tests.serving import ANY_PORT, gateways

BOUNCES = "bounces.flood.example"
DOMAIN = "flood.example"
JOBS = 40
FORGED = 80
CONNECTIONS = 8
LIMIT = 64 * 1024
# Who reports on each genuine job, in turn: what each makes of its recipient.
GENUINE: list[tuple[Callable[[str, str], bytes], str]] = [
    (samples.postfix_dsn, "hard"),
    (samples.gmail_dsn, "hard"),
    (samples.qmail_bounce, "hard"),
    (samples.delayed_dsn, "soft"),
    (samples.arf_complaint, "complaint"),
]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """A bounce domain, its key, and a small message limit for the listener."""
    return settings.model_copy(
        update={
            "secret_key": SecretStr(watched(new_key())),
            "bounce_domain": BOUNCES,
            "bounce_max_message_bytes": LIMIT,
        }
    )


def _deliver(port: int, rcpt: str, message: bytes) -> str:
    """One message over its own connection, as a remote MTA sends it; what was answered,
    in a word (``refused`` at RCPT, ``too_large``, ``accepted``, ``dropped``), or the
    error that broke the session.
    """
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as session:
            session.ehlo("mx.sender.example")
            session.mail("<>")
            code, _ = session.rcpt(rcpt)
            if code != 250:
                return f"refused {code}"
            code, said = session.data(message)
    except smtplib.SMTPException as exc:
        return f"error {type(exc).__name__}"
    if code == 552:
        return "too_large"
    if code != 250:
        return f"answered {code}"
    return "dropped" if b"dropped" in said else "accepted"


async def test_a_flood_of_bounces_genuine_forged_oversized_and_malformed(
    settings: Settings,
    channel: AbstractChannel,
    store: JobStore,
    smtp: CaptureServer,
    worker: RunningWorker,
    ledger: list[Account],
) -> None:
    names = Names(settings.prefix)
    events = await listen_events(channel, names)
    sender = {"email": f"news@{DOMAIN}", "name": "Flood"}
    ids = [f"flood-{n}" for n in range(JOBS)]
    for job_id in ids:
        body = job(id=job_id, domain=DOMAIN, subject=job_id, to=[f"{job_id}@rcpt.example"])
        await publish_job(channel, {**body, "from": sender}, names=names)
    async with asyncio.timeout(30):
        received = await smtp.wait_for(JOBS)
    returns = {str(mail.message()["Subject"]): mail.mail_from for mail in received}
    for job_id in ids:
        await settled_record(store, job_id)

    genuine: list[tuple[str, bytes, str, str]] = []  # (job, message, return, kind)
    for n, job_id in enumerate(ids):
        make, kind = GENUINE[n % len(GENUINE)]
        genuine.append(
            (job_id, make(returns[job_id], f"{job_id}@rcpt.example"), returns[job_id], kind)
        )
    flood: list[tuple[str, str, bytes]] = [("genuine", r, m) for _, m, r, _ in genuine]
    one = returns[ids[0]]
    for n in range(FORGED):  # forged: another domain, a flipped MAC, a made-up id
        local, _, _ = returns[ids[n % JOBS]].partition("@")
        head, mac = local.rsplit("-", 1)
        forged = [
            f"{local}@elsewhere.example",
            f"{head}-{'b' if mac[0] == 'a' else 'a'}{mac[1:]}@{BOUNCES}",
            f"bi-mfrgg{n:03d}-{mac}@{BOUNCES}",
        ][n % 3]
        flood.append(("forged", forged, samples.postfix_dsn(forged, "victim@rcpt.example")))
    # Oversized: a DSN with 100 KiB of the original message after it.
    big = samples.postfix_dsn(one, f"{ids[0]}@rcpt.example") + (b"y" * 78 + b"\r\n") * 1300
    flood += [("too_large", one, big)] * 20
    malformed = [
        samples.mime_bomb(one),
        samples.report_without_status(one),
        samples.plain_mail(one),
        (b"\x00\xff" * 30 + b"\r\n") * 150,
    ]
    for n in range(40):
        flood.append(("malformed", one, malformed[n % len(malformed)]))
    for n in range(20):  # a genuine return naming someone else: no victim suppressed
        flood.append(("not_a_recipient", one, samples.postfix_dsn(one, f"victim{n}@rcpt.example")))
    assert len(flood) == 200

    async with gateways(settings, bounces=ANY_PORT) as ports:
        port = ports["bounces"]
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(CONNECTIONS) as pool:
            answers = await asyncio.gather(
                *(loop.run_in_executor(pool, _deliver, port, rcpt, msg) for _, rcpt, msg in flood)
            )
            # Sent again, as MTAs do when the 250 was lost on the way.
            again = await asyncio.gather(
                *(loop.run_in_executor(pool, _deliver, port, r, m) for _, m, r, _ in genuine)
            )
        alive = await asyncio.to_thread(_deliver, port, one, samples.plain_mail(one))

    by_kind: dict[str, Counter[str]] = {}
    for (what, _, _), answer in zip(flood, answers, strict=True):
        by_kind.setdefault(what, Counter())[answer.split(" ")[0]] += 1
    assert by_kind == {
        "genuine": Counter(accepted=JOBS),
        "forged": Counter(refused=FORGED),
        "too_large": Counter(too_large=20),
        "malformed": Counter(dropped=40),
        "not_a_recipient": Counter(accepted=20),
    }
    assert Counter(again) == Counter(accepted=JOBS)
    assert alive == "dropped"

    recorded: Counter[str] = Counter()
    for job_id, _, _, kind in genuine:
        record = await store.get(job_id)
        assert record is not None
        assert [e["kind"] for e in record.get("feedback", [])] == [kind], job_id
        recorded[kind] += 1
    suppressed = await SuppressionStore(store.database).find(1000, domain=DOMAIN)
    assert sorted(doc["address"] for doc in suppressed) == sorted(
        f"{job_id}@rcpt.example" for job_id, _, _, kind in genuine if kind != "soft"
    )
    seen: list[str] = []

    async def every_event() -> bool:
        seen.extend(key for key, _ in await drain_events(channel, events) if key != "mail.sent")
        return len(seen) >= JOBS

    await until(every_event, 10)
    await asyncio.sleep(0.2)  # and no more than one each
    seen.extend(key for key, _ in await drain_events(channel, events) if key != "mail.sent")
    assert Counter(seen) == Counter({"mail.bounced": 32, "mail.complained": 8})
    ledger.append(
        Account(
            "bounce flood: 200 inbound over 8 connections, then the genuine 40 again",
            published=len(flood) + len(again),
            notes={
                "recorded once": dict(recorded),
                "forged refused at RCPT": FORGED,
                "oversized refused 552": 20,
                "malformed dropped 250": 40,
                "not a recipient dropped 250": 20,
                "resent, recorded again": 0,
            },
        )
    )
