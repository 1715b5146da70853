"""Domain authorization: keys stored hashed, allowed broker users, `unauthorized` dead letters."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import argon2
import bcrypt
import pytest
from aio_pika.abc import AbstractChannel
from pydantic import SecretStr

from consumer.core.headers import (
    DOMAIN_HEADER,
    DUE_HEADER,
    RELEASED_AT_HEADER,
    SEAL_HEADER,
    USER_HEADER,
)
from consumer.core.leases import Release
from consumer.core.names import Names
from consumer.service.authorization import Authority, Intake, intake, seal, without_domain_key
from consumer.settings import Settings
from consumer.store.domains import hash_key, key_matches
from consumer.store.jobs import JobStore
from consumer.vault import Vault, new_key
from deploy.devstack.processes import mailbus
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import depth, encode, job, take, until
from tests.conftest import RunningWorker
from tests.secret_watch import watched

DOMAIN_KEY = watched("dk-correct-horse-0042")


def test_key_hash_is_salted_and_checks_the_key() -> None:
    first, second = hash_key(DOMAIN_KEY), hash_key(DOMAIN_KEY)
    assert first != second
    assert DOMAIN_KEY not in first
    assert key_matches(DOMAIN_KEY, first)
    assert key_matches(DOMAIN_KEY, second)
    assert not key_matches("dk-wrong", first)
    assert not key_matches(DOMAIN_KEY, "md5$whatever")
    assert not key_matches(DOMAIN_KEY, "garbage")


def test_the_old_daemons_password_hashes_verify_as_they_are() -> None:
    # PHP's password_hash writes bcrypt as $2y$ (the same algorithm as $2b$), and
    # libsodium's crypto_pwhash_str writes Argon2id; the old daemon offered both and Argon2i.
    bcrypt_hash = "$2y$" + bcrypt.hashpw(b"abc12345", bcrypt.gensalt(4)).decode()[4:]
    argon2i = argon2.PasswordHasher(time_cost=1, memory_cost=1024, type=argon2.Type.I)
    argon2id = argon2.PasswordHasher(time_cost=1, memory_cost=1024, type=argon2.Type.ID)
    for stored in (bcrypt_hash, argon2i.hash("abc12345"), argon2id.hash("abc12345")):
        assert key_matches("abc12345", stored), stored
        assert not key_matches("abc12346", stored), stored
        assert not key_matches("abc12345", stored[:-3]), stored  # damaged: no match, no error
    # bcrypt reads 72 bytes, as PHP's password_verify did.
    long_hash = bcrypt.hashpw(b"x" * 72, bcrypt.gensalt(4)).decode()
    assert key_matches("x" * 80, long_hash)


def test_a_seal_binds_its_authority_to_the_id_the_body_and_a_time() -> None:
    vault, other = Vault([new_key()]), Vault([new_key()])
    body = b'{"domain": "example.com"}'
    now = datetime(2031, 5, 4, 12, 0, tzinfo=UTC)
    authority = Authority("app1", "Example.com", Release("w1", now))
    headers = seal(
        {"x-keep": 1, DUE_HEADER: 5, SEAL_HEADER: "stale"},
        authority,
        message_id="j1",
        body=body,
        vault=vault,
        expires=now + timedelta(days=1),
    )
    assert headers["x-keep"] == 1
    assert headers[DOMAIN_HEADER] == "example.com"

    def taken(
        headers: dict[str, Any] = headers,
        *,
        user_id: str | None = None,
        message_id: str = "j1",
        body: bytes = body,
        vault: Vault | None = vault,
        now: datetime = now,
    ) -> Authority:
        return intake(
            headers, user_id=user_id, message_id=message_id, body=body, vault=vault, now=now
        ).authority

    assert taken() == Authority("app1", "example.com", Release("w1", now))
    assert taken(user_id="app2").user == "app2"  # user_id, checked by RabbitMQ, comes first
    # Moved to another id or body, opened with another key, or too late: it says nothing.
    for moved in (
        taken(message_id="j2"),
        taken(body=body + b" "),
        taken(vault=other),
        taken(vault=None),
        taken(now=now + timedelta(days=2)),
        taken({**headers, DOMAIN_HEADER: "bank.example"}),
        taken({**headers, USER_HEADER: "root"}),
    ):
        assert moved == Authority()
    # Seals no worker wrote, shaped to break the parsing of one: nothing, and no error.
    signature = str(headers[SEAL_HEADER]).partition(".")[2]
    for stamp in ("99999999999999.é", "².ab", "9" * 5000 + ".ab", f"+1.{signature}", 7):
        assert taken({**headers, SEAL_HEADER: stamp}) == Authority()
    far = {**headers, RELEASED_AT_HEADER: 2**62}  # a release no clock can hold
    assert taken(far) == Authority()
    # A producer's own x-mailbus-* headers carry nothing and are not kept; the due time is.
    forged = {USER_HEADER: "app1", SEAL_HEADER: "9999999999999.00", "x-mailbus-reason": "x"}
    kept = intake(
        {**forged, DUE_HEADER: 5, "x-app": "a"},
        user_id=None,
        message_id="j1",
        body=body,
        vault=vault,
        now=now,
    )
    assert kept == Intake(Authority(), {DUE_HEADER: 5, "x-app": "a"})


def test_a_body_loses_its_domain_key_whatever_its_shape() -> None:
    body = encode(job(domain_key=DOMAIN_KEY, subject="s"))
    stripped = without_domain_key(body)
    assert json.loads(stripped) == {k: v for k, v in json.loads(body).items() if k != "domain_key"}
    keyless = encode(job())
    assert without_domain_key(keyless) is keyless
    broken = b'{"domain_key": "' + DOMAIN_KEY.encode() + b'", "subject": "cut'
    assert without_domain_key(broken) == b'{"domain_key":"***", "subject": "cut'
    latin = broken.replace(b"cut", "coupé".encode("latin-1"))  # not UTF-8, yet redacted
    assert without_domain_key(latin) == b'{"domain_key":"***", "subject": "coup\xe9'
    assert without_domain_key(b"\xff\xfe not utf-8") == b"\xff\xfe not utf-8"
    for hidden in (
        broken.decode().encode("utf-16"),  # the field's name in another encoding JSON allows
        b'{"domain\\u005fkey": "' + DOMAIN_KEY.encode() + b'", ',  # an escaped field name
    ):
        dropped = without_domain_key(hidden)
        assert DOMAIN_KEY.encode() not in dropped
        assert json.loads(dropped)["dropped"].startswith("a body of")


@pytest.fixture
def signed(settings: Settings) -> Settings:
    """The test's settings with a secret key (and the default outbox kept)."""
    return settings.model_copy(update={"secret_key": SecretStr(new_key())})


@pytest.fixture
async def as_guest(signed: Settings, channel: AbstractChannel) -> AsyncIterator[RunningWorker]:
    """A worker for ``signed``."""
    running = RunningWorker(signed)
    yield running
    await running.shutdown()


async def publish(
    channel: AbstractChannel,
    names: Names,
    body: dict[str, object],
    user_id: str | None = None,
    headers: dict[str, object] | None = None,
) -> None:
    """Publish ``body`` as a producer would, as ``user_id`` (checked by RabbitMQ)."""
    exchange = await channel.get_exchange(names.exchange)
    message = aio_pika.Message(
        encode(body),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        user_id=user_id,
        headers=headers or {},
    )
    await exchange.publish(message, routing_key="send")


async def test_domain_keys_and_allowed_users(
    signed: Settings, channel: AbstractChannel, smtp: CaptureServer, as_guest: RunningWorker
) -> None:
    names = Names(signed.prefix)
    user = urlsplit(signed.amqp_url.get_secret_value()).username or ""
    added = await mailbus(
        signed, "domain", "add", "Example.com", "--key-stdin", "--allow-user", user,
        input=DOMAIN_KEY + "\n",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    await mailbus(signed, "domain", "add", "keyonly.example", "--key-stdin", input="k2\n")
    async with JobStore.connect(signed) as jobs:
        raw = await jobs.database["domains"].find_one({"_id": "example.com"})
    assert raw is not None
    assert DOMAIN_KEY not in json.dumps(raw, default=str)
    shown = await mailbus(signed, "domain", "show", "example.com")
    assert json.loads(shown.stdout)["key"] == "set"
    assert DOMAIN_KEY not in shown.stdout

    # The allowed user's job is retried once: its copy carries the user, signed.
    smtp.faults.refuse_data("451 4.3.0 try again")
    await publish(channel, names, job(id="by-user", subject="allowed user"), user_id=user)
    await smtp.wait_for(1)
    async with JobStore.connect(signed) as jobs:
        record = await jobs.get("by-user")
    assert record is not None
    assert (record["status"], record["attempts"]) == ("sent", 2)

    await publish(channel, names, job(subject="right key", domain_key=DOMAIN_KEY))
    await publish(channel, names, job(subject="wrong key", domain_key="dk-wrong"))
    await publish(channel, names, job(subject="no key, no user"))
    forged = {USER_HEADER: user, SEAL_HEADER: "9999999999999." + "0" * 64}
    await publish(channel, names, job(subject="forged header"), headers=forged)
    elsewhere = job(subject="user, key-only domain", domain="keyonly.example")
    await publish(channel, names, elsewhere, user_id=user)

    dead = await take(channel, names.dead, 4)
    await smtp.wait_for(2)
    assert sorted(m.message()["Subject"] for m in smtp.received()) == [
        "allowed user",
        "right key",
    ]
    reasons = {json.loads(d.body)["subject"]: d.headers["x-mailbus-reason"] for d in dead}
    errors = {json.loads(d.body)["subject"]: d.headers["x-mailbus-error"] for d in dead}
    assert reasons == {
        "wrong key": "unauthorized",
        "no key, no user": "unauthorized",
        "forged header": "unauthorized",
        "user, key-only domain": "unauthorized",
    }
    assert errors["wrong key"] == "wrong domain key for example.com"
    assert f"broker user {user!r} may not send for keyonly" in str(errors["user, key-only domain"])
    assert await depth(channel, names.dead) == 0


async def test_domain_commands(signed: Settings) -> None:
    without_secret = signed.model_copy(update={"secret_key": None})
    refused = await mailbus(without_secret, "domain", "add", "a.example", "--allow-user", "app")
    assert refused.returncode == 2
    assert "MAILBUS_SECRET_KEY" in refused.stderr
    nothing = await mailbus(signed, "domain", "add", "a.example")
    assert nothing.returncode == 2
    added = await mailbus(signed, "domain", "add", "a.example", "--allow-user", "app")
    assert added.returncode == 0, added.stderr
    again = await mailbus(signed, "domain", "add", "a.example", "--allow-user", "b")
    assert again.returncode == 1
    assert "exists" in again.stderr
    replaced = await mailbus(
        signed, "domain", "add", "a.example", "--allow-user", "b", "--allow-user", "c", "--replace"
    )
    assert replaced.returncode == 0
    listed = await mailbus(signed, "domain", "ls")
    assert listed.stdout.splitlines()[1].split() == ["a.example", "-", "b,", "c", "a.example", "-"]
    assert (await mailbus(signed, "domain", "rm", "a.example")).returncode == 0
    gone = await mailbus(signed, "domain", "show", "a.example")
    assert gone.returncode == 1
    assert "not registered" in gone.stderr


async def test_a_replayed_dead_letter_is_still_authorized(
    signed: Settings, channel: AbstractChannel, smtp: CaptureServer, as_guest: RunningWorker
) -> None:
    """The dead letter lost its domain key but carries the signed authorization: once the
    cause is fixed, its replay sends.
    """
    names = Names(signed.prefix)
    added = await mailbus(signed, "domain", "add", "example.com", "--key-stdin", input=DOMAIN_KEY)
    assert added.returncode == 0, added.stderr
    smtp.faults.refuse_data("554 5.7.1 rejected for now")
    await publish(channel, names, job(id="keyed", subject="replay me", domain_key=DOMAIN_KEY))

    async def one_dead() -> bool:
        return await depth(channel, names.dead) == 1

    await until(one_dead, seconds=20)
    dead = await mailbus(signed, "dead", "show", "keyed")
    assert dead.returncode == 0, dead.stderr
    letter = json.loads(dead.stdout)
    assert "domain_key" not in letter["body"]
    assert letter["headers"][DOMAIN_HEADER] == "example.com"
    replayed = await mailbus(signed, "dead", "replay", "keyed")
    assert "keyed: replayed (permanent)" in replayed.stdout
    async with asyncio.timeout(20):
        [mail] = await smtp.wait_for(1)
    assert mail.message()["Subject"] == "replay me"
