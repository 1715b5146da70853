"""One tenant (domain) never touches another's mail: hostile producers on the same broker
try control messages, squatted job ids, copied seals and forged ``x-mailbus-*`` headers,
senders of another domain and replies into any queue; waiting copies keep no key. Each
scenario ends in an exact account of what was sent, refused and left alone.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pydantic import SecretStr

from consumer.amqp.dead_letters import browse
from consumer.amqp.publish import publish_and_wait
from consumer.core import ladder
from consumer.core.headers import (
    DOMAIN_HEADER,
    DUE_HEADER,
    RELEASED_AT_HEADER,
    RELEASED_BY_HEADER,
    SEAL_HEADER,
)
from consumer.core.names import Names
from consumer.core.schedule import to_epoch_ms
from consumer.settings import Settings
from consumer.store.domains import DomainStore, hash_key
from consumer.store.jobs import JobStore
from consumer.vault import new_key
from deploy.devstack.processes import mailbus
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import control, depth, encode, job, take, until
from tests.conftest import RunningWorker, settled_record
from tests.reliability.accounts import Account, subjects
from tests.secret_watch import watched

BANK_KEY = watched("dk-Bn4kQ7-the-bank-key")
CORP_KEY = watched("dk-Cp2rX5-the-corp-key")


@pytest.fixture
def tenants(settings: Settings) -> Settings:
    """The test's settings with a secret key, so copies carry sealed authorizations."""
    return settings.model_copy(update={"secret_key": SecretStr(watched(new_key()))})


@pytest.fixture
async def registry(tenants: Settings, store: JobStore) -> DomainStore:
    """bank.example (its own senders) and corp.example (one more sender domain)."""
    domains = DomainStore(store.database)
    await domains.put("bank.example", hash_key(BANK_KEY), [], replace=True)
    await domains.put(
        "corp.example",
        hash_key(CORP_KEY),
        [],
        replace=True,
        senders=["corp.example", "mail.corp-news.example"],
    )
    return domains


@pytest.fixture
async def running(
    tenants: Settings, channel: AbstractChannel, registry: DomainStore
) -> AsyncIterator[RunningWorker]:
    worker = RunningWorker(tenants)
    yield worker
    await worker.shutdown()


def bank(**fields: Any) -> dict[str, Any]:
    """A bank.example job with its key."""
    return job(domain="bank.example", domain_key=BANK_KEY, **{"from": "pay@bank.example"} | fields)


def shop(**fields: Any) -> dict[str, Any]:
    """A job of shop.example, an open (unregistered) domain."""
    return job(domain="shop.example", **{"from": "hello@shop.example"} | fields)


async def publish(
    channel: AbstractChannel,
    names: Names,
    body: dict[str, Any] | bytes,
    *,
    message_id: str | None = None,
    headers: dict[str, Any] | None = None,
    reply_to: str | None = None,
) -> None:
    """Publish as any producer on the broker can."""
    exchange = await channel.get_exchange(names.exchange)
    message = aio_pika.Message(
        body if isinstance(body, bytes) else encode(body),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
        headers=headers or {},
        reply_to=reply_to,
        correlation_id="c1" if reply_to else None,
    )
    await exchange.publish(message, routing_key="send")


def later(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


async def status_of(store: JobStore, job_id: str) -> str | None:
    record = await store.get(job_id)
    return record.get("status") if record is not None else None


def reasons(letters: list[AbstractIncomingMessage]) -> Counter[str]:
    return Counter(str((m.headers or {}).get("x-mailbus-reason")) for m in letters)


async def test_control_messages_act_only_for_their_domain(
    tenants: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    running: RunningWorker,
    ledger: list[Account],
) -> None:
    """Without the bank's key nobody cancels or moves the bank's mail, nor cancels an id
    of it in advance; with it, both work, as they do for an open domain's mail.
    """
    names = Names(tenants.prefix)
    await publish(channel, names, bank(id="bank-1", subject="bank-1", send_at=later(4)))
    await publish(channel, names, bank(id="bank-2", subject="bank-2", send_at=later(4)))
    await publish(channel, names, shop(id="shop-1", subject="shop-1", send_at=later(4)))

    async def scheduled() -> bool:
        found = [await status_of(store, i) for i in ("bank-1", "bank-2", "shop-1")]
        return found == ["scheduled"] * 3

    await until(scheduled)
    far = later(86400)
    refused = [
        {"cancel": "bank-1"},
        {"reschedule": "bank-1", "send_at": far},
        {"cancel": "bank-1", "domain_key": "dk-guessed"},
        {"cancel": "unseen"},  # a job not seen yet: whose?
        {"cancel": "bank-3", "domain": "bank.example"},
        {"cancel": "bank-1", "domain": "shop.example"},  # claiming it is another's
    ]
    answers = [await control(channel, names, r) for r in refused]
    assert [a["status"] for a in answers] == ["refused"] * len(refused), answers
    allowed = [
        {"cancel": "bank-2", "domain_key": BANK_KEY},
        {"cancel": "shop-1"},
        {"cancel": "bank-3", "domain": "bank.example", "domain_key": BANK_KEY},
        {"reschedule": "bank-1", "send_at": later(1), "domain_key": BANK_KEY},
    ]
    answers = [await control(channel, names, r) for r in allowed]
    assert [a["status"] for a in answers] == ["cancelled"] * 3 + ["rescheduled"], answers
    assert "a new copy was published" in answers[-1]["detail"]
    await publish(channel, names, bank(id="bank-3", subject="bank-3"))
    async with asyncio.timeout(15):
        await smtp.wait_for(1)
        await until(lambda: _is(store, "bank-3", "cancelled"))
    letters = await take(channel, names.dead, len(refused))
    await asyncio.sleep(0.5)
    assert await depth(channel, names.dead) == 0
    assert reasons(letters) == {"unauthorized": len(refused)}
    assert not any(BANK_KEY.encode() in m.body for m in letters)
    arrived = subjects(smtp.received())
    assert arrived == {"bank-1": 1}
    statuses = {i: await status_of(store, i) for i in ("bank-1", "bank-2", "shop-1", "bank-3")}
    assert statuses == {
        "bank-1": "sent",
        "bank-2": "cancelled",
        "shop-1": "cancelled",
        "bank-3": "cancelled",
    }
    ledger.append(
        Account(
            "control across tenants",
            published=4,
            sent=1,
            notes={"cancelled with the key or open": 3, "refused unauthorized": len(refused)},
        )
    )


async def _is(store: JobStore, job_id: str, status: str) -> bool:
    return await status_of(store, job_id) == status


async def test_a_job_id_is_never_taken_across_domains(
    tenants: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    running: RunningWorker,
    ledger: list[Account],
) -> None:
    """An open domain takes a registered domain's id first, or publishes one the registered
    domain has scheduled: each copy of the other domain is a ``conflict`` dead letter; no
    mail goes out for a domain under another's id, and none is dropped as "already sent".
    """
    names = Names(tenants.prefix)
    await publish(channel, names, shop(id="invoice-7", subject="squatter"))
    async with asyncio.timeout(10):
        await smtp.wait_for(1)
    await publish(channel, names, bank(id="invoice-7", subject="bank invoice"))
    await publish(channel, names, bank(id="statement-1", subject="statement", send_at=later(3)))
    await until(lambda: _is(store, "statement-1", "scheduled"))
    await publish(channel, names, shop(id="statement-1", subject="hijack now"))
    letters = await take(channel, names.dead, 2)
    async with asyncio.timeout(15):
        await smtp.wait_for(2)
    await until(lambda: _is(store, "statement-1", "sent"))
    await publish(channel, names, shop(id="statement-1", subject="hijack after"))
    letters += await take(channel, names.dead, 1)
    assert reasons(letters) == {"conflict": 3}
    dead_subjects = sorted(json.loads(m.body)["subject"] for m in letters)
    assert dead_subjects == ["bank invoice", "hijack after", "hijack now"]
    assert subjects(smtp.received()) == {"squatter": 1, "statement": 1}
    record = await settled_record(store, "statement-1")
    assert (record["domain"], record["subject"]) == ("bank.example", "statement")
    ledger.append(
        Account(
            "job ids across domains",
            published=5,
            sent=2,
            dead=3,
            dead_reasons={"conflict": 3},
        )
    )


async def test_copied_seals_and_forged_headers_carry_nothing(
    tenants: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    running: RunningWorker,
    ledger: list[Account],
) -> None:
    """A seal read off a dead letter authorizes neither a new id nor a new body, ``dead
    show`` masks it, and forged release headers make no worker send a job twice.
    """
    names = Names(tenants.prefix)
    smtp.faults.refuse_data("554 5.7.1 not today")
    await publish(channel, names, bank(id="bank-dead", subject="dies"))
    await until(lambda: _count(channel, names.dead, 1), seconds=15)
    shown = json.loads((await mailbus(tenants, "dead", "show", "bank-dead")).stdout)
    assert shown["headers"][SEAL_HEADER] == "***"
    assert "domain_key" not in shown["body"]
    [letter] = await take(channel, names.dead, 1)
    headers = dict(letter.headers or {})
    stolen = {DOMAIN_HEADER: headers[DOMAIN_HEADER], SEAL_HEADER: headers[SEAL_HEADER]}
    keyless = json.loads(letter.body)
    await publish(channel, names, keyless | {"id": "forged-1", "subject": "new id"}, headers=stolen)
    await publish(
        channel, names, keyless | {"subject": "new body"}, message_id="bank-dead", headers=stolen
    )

    # A slow send, and a "released" copy of it naming the worker that holds it.
    smtp.faults.data_delay = 1.5
    slow = bank(id="slow-1", subject="slow")
    await publish(channel, names, slow)
    await until(lambda: _is(store, "slow-1", "sending"))
    now_ms = to_epoch_ms(datetime.now(UTC))
    forged = {
        RELEASED_BY_HEADER: running.worker.worker_id,
        RELEASED_AT_HEADER: now_ms + 60_000,
        DUE_HEADER: now_ms,
    }
    await publish(channel, names, slow, message_id="slow-1", headers=forged)
    letters = await take(channel, names.dead, 2)
    async with asyncio.timeout(15):
        await smtp.wait_for(1)
        await until(lambda: _is(store, "slow-1", "sent"))
    await asyncio.sleep(2)  # time for a second send, had the forged release been honoured
    assert reasons(letters) == {"unauthorized": 2}
    assert subjects(smtp.received()) == {"slow": 1}
    ledger.append(
        Account(
            "copied seals and forged headers",
            published=4,
            sent=1,
            dead=3,
            dead_reasons={"permanent": 1, "unauthorized": 2},
            notes={"forged release copies sent": 0},
        )
    )


async def _count(channel: AbstractChannel, queue: str, count: int) -> bool:
    return await depth(channel, queue) >= count


async def test_a_sender_belongs_to_its_domain(
    tenants: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    registry: DomainStore,
    ledger: list[Account],
) -> None:
    """An open domain cannot send as a registered one; a registered domain sends as itself,
    its subdomains and the sender domains it lists; a closed install refuses open domains.
    """
    names = Names(tenants.prefix)
    cases = {
        "open as itself": (shop(), True),
        "open as the bank": (shop(**{"from": "ceo@bank.example"}), False),
        "open as a bank subdomain": (shop(**{"from": "news@mail.bank.example"}), False),
        "bank as itself": (bank(), True),
        "bank as its subdomain": (bank(**{"from": "x@alerts.bank.example"}), True),
        "bank as the shop": (bank(**{"from": "x@shop.example"}), False),
        "corp as its listed sender": (
            job(domain="corp.example", domain_key=CORP_KEY, **{"from": "a@mail.corp-news.example"}),
            True,
        ),
    }
    worker = RunningWorker(tenants)
    try:
        for subject, (body, _) in cases.items():
            await publish(
                channel, names, body | {"id": subject.replace(" ", "-"), "subject": subject}
            )
        allowed = [s for s, (_, ok) in cases.items() if ok]
        letters = await take(channel, names.dead, len(cases) - len(allowed))
        async with asyncio.timeout(15):
            await smtp.wait_for(len(allowed))
    finally:
        await worker.shutdown()
    assert sorted(subjects(smtp.received())) == sorted(allowed)
    refused = {json.loads(m.body)["subject"]: m for m in letters}
    assert sorted(refused) == sorted(s for s, (_, ok) in cases.items() if not ok)
    assert reasons(letters) == {"unauthorized": len(refused)}
    error = str((refused["open as the bank"].headers or {})["x-mailbus-error"])
    assert error == "sender domain bank.example belongs to a registered domain, not to shop.example"

    # A multi-tenant install: an open domain sends nothing at all.
    closed = tenants.model_copy(update={"open_domains": False})
    smtp.reset()
    worker = RunningWorker(closed)
    try:
        await publish(channel, names, shop(id="closed-open", subject="closed-open"))
        await publish(channel, names, bank(id="closed-bank", subject="closed-bank"))
        [letter] = await take(channel, names.dead, 1)
        async with asyncio.timeout(15):
            await smtp.wait_for(1)
    finally:
        await worker.shutdown()
    assert subjects(smtp.received()) == {"closed-bank": 1}
    assert json.loads(letter.body)["id"] == "closed-open"
    assert "open domains are refused" in str((letter.headers or {})["x-mailbus-error"])
    ledger.append(
        Account(
            "senders across domains",
            published=len(cases) + 2,
            sent=len(allowed) + 1,
            dead=len(refused) + 1,
            dead_reasons={"unauthorized": len(refused) + 1},
        )
    )


async def test_replies_reach_only_reply_queues(
    tenants: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    ledger: list[Account],
) -> None:
    """A reply_to naming any queue is not answered; RabbitMQ's direct reply-to and the
    operator's reply-queue prefix are.
    """
    names = Names(tenants.prefix)
    prefix = f"{tenants.prefix}.replies."
    settings = tenants.model_copy(update={"reply_queue_prefix": prefix})
    victim = await channel.declare_queue(f"{tenants.prefix}.orders", auto_delete=True)
    ours = await channel.declare_queue(f"{prefix}app1", auto_delete=True)
    worker = RunningWorker(settings)
    try:
        await publish(channel, names, job(id="to-victim", subject="v"), reply_to=victim.name)
        await publish(channel, names, job(id="to-prefix", subject="p"), reply_to=ours.name)
        exchange = await channel.get_exchange(names.exchange)
        message = aio_pika.Message(encode(job(id="direct", subject="d")), delivery_mode=2)
        async with asyncio.timeout(15):
            direct = json.loads(await publish_and_wait(channel, exchange, message, "send"))
            await smtp.wait_for(3)
            # The answer is published as the job settles, a moment after the mail is in.
            [answer] = await take(channel, ours.name, 1)
        await asyncio.sleep(0.5)
        assert await depth(channel, victim.name) == 0
    finally:
        await worker.shutdown()
    assert (direct["id"], direct["status"]) == ("direct", "sent")
    assert json.loads(answer.body)["id"] == "to-prefix"
    assert subjects(smtp.received()) == {"v": 1, "p": 1, "d": 1}
    ledger.append(Account("replies", published=3, sent=3, notes={"answered elsewhere": 0}))


async def test_waiting_copies_and_records_keep_no_key(
    tenants: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    registry: DomainStore,
    ledger: list[Account],
) -> None:
    """A scheduled and a retried job of a registered domain wait in the ladder and in their
    records without the key, and still send; a dead letter of a broken body loses it too.
    """
    names = Names(tenants.prefix)
    # A retry long enough to wait in the ladder rather than be held in place.
    slow_retry = tenants.model_copy(update={"retry_base_delay": 4.0, "retry_max_delay": 4.0})
    running = RunningWorker(slow_retry)
    try:
        smtp.faults.refuse_data("451 4.3.0 later")
        await publish(channel, names, bank(id="retried", subject="retried"))
        await publish(channel, names, bank(id="scheduled", subject="scheduled", send_at=later(3)))
        broken = b'{"domain_key": "' + BANK_KEY.encode() + b'", "domain": "bank.exa'
        await publish(channel, names, broken, message_id="broken")

        async def waiting() -> bool:
            found = [await status_of(store, i) for i in ("retried", "scheduled")]
            return found == ["scheduled"] * 2

        await until(waiting)
        copies: list[bytes] = []
        for level in range(ladder.LEVELS):
            async with browse(channel, names.delay(level), 10) as held:
                copies += [m.body for m in held]
        records = [await store.get(i) for i in ("retried", "scheduled")]
        assert len(copies) == 2
        assert all(BANK_KEY.encode() not in body for body in copies)
        assert all(r is not None and BANK_KEY.encode() not in bytes(r["body"]) for r in records)
        [letter] = await take(channel, names.dead, 1)
        assert BANK_KEY.encode() not in letter.body
        assert (letter.headers or {})["x-mailbus-reason"] == "invalid"
        async with asyncio.timeout(15):
            await smtp.wait_for(2)
    finally:
        await running.shutdown()
    assert subjects(smtp.received()) == {"retried": 1, "scheduled": 1}
    ledger.append(
        Account(
            "keys in waiting copies",
            published=3,
            sent=2,
            dead=1,
            dead_reasons={"invalid": 1},
            notes={"copies or records holding the key": 0},
        )
    )
