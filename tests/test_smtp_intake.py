"""The SMTP submission gateway, driven by real clients (Python's smtplib, Django's SMTP
email backend, msmtp) against a worker, the real broker, the test database and the capture
SMTP server: the mail that arrives, byte for byte, its envelope, and the refusals' codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import ssl
from collections.abc import AsyncIterator, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.core.mail import get_connection, send_mail
from pydantic import SecretStr

from consumer.core.api_keys import MAX_API_KEYS
from consumer.service.authorization import CACHE_SECONDS as DOMAIN_CACHE_SECONDS
from consumer.settings import Settings
from consumer.store.domains import DomainStore, hash_key
from consumer.store.jobs import JobStore
from consumer.vault import new_key
from deploy.devstack.processes import mailbus, run_with
from deploy.devstack.smtp_capture import CaptureServer
from deploy.devstack.tls import self_signed
from tests.conftest import RunningWorker, settled_record
from tests.secret_watch import watched
from tests.serving import ANY_PORT, gateways
from tests.test_dkim import verifies

DOMAIN = "submit.example"
DOMAIN_KEY = watched("dk-submit-0042-correct")
API_KEY = watched("ak-submit-0042-horse-battery")


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Sealing with a secret key (the gateway vouches for the domain), plain AUTH allowed
    on the loopback listener, a small recipient limit.
    """
    return settings.model_copy(
        update={
            "secret_key": SecretStr(watched(new_key())),
            "gateway_smtp_loopback_plain_auth": True,
            "gateway_smtp_max_recipients": 3,
            "max_message_bytes": 64 * 1024,
        }
    )


@pytest.fixture
async def port(settings: Settings, store: JobStore, worker: RunningWorker) -> AsyncIterator[int]:
    """The SMTP gateway on a free loopback port, a worker behind it, the domain registered
    with its key and an API key named ``app``.
    """
    domains = DomainStore(store.database)
    await domains.put(DOMAIN, hash_key(DOMAIN_KEY), [], True)
    assert await domains.add_api_key(DOMAIN, "app", hash_key(API_KEY), MAX_API_KEYS) == "added"
    async with gateways(settings, smtp=ANY_PORT) as ports:
        yield ports["smtp"]


@contextlib.contextmanager
def client(
    port: int, login: tuple[str, str] | None = (DOMAIN, DOMAIN_KEY)
) -> Iterator[smtplib.SMTP]:
    """An smtplib session, logged in as ``login``."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as session:
        session.ehlo("client.example")
        if login is not None:
            session.login(*login)
        yield session


MESSAGE = (
    b"From: App <app@submit.example>\r\n"
    b"To: Reader <reader@example.org>\r\n"
    b"Bcc: hidden@example.org\r\n"
    b"Subject: =?utf-8?q?Caf=C3=A9?= by SMTP\r\n"
    b"Message-ID: <one@submit.example>\r\n"
    b"Date: Mon, 07 Dec 2026 04:00:00 +0000\r\n"
    b"X-Mailbus-Tags: welcome, smtp-test\r\n"
    b"X-Mailbus-Id: submitted-1\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello over SMTP.\r\n"
)
# What the relay must receive: the same bytes without the steering and Bcc fields.
SENT = b"".join(
    line
    for line in MESSAGE.splitlines(keepends=True)
    if not line.startswith((b"X-Mailbus-", b"Bcc:"))
)


async def in_thread(call: Any, *args: Any) -> Any:
    """Run a blocking client call off the event loop the gateway and worker run on."""
    return await asyncio.to_thread(call, *args)


async def test_a_submitted_message_arrives_as_sent_with_its_envelope(
    smtp: CaptureServer, store: JobStore, port: int
) -> None:
    def submit() -> dict[str, Any]:
        with client(port) as session:
            return session.sendmail(
                "app@submit.example", ["reader@example.org", "hidden@example.org"], MESSAGE
            )

    assert await in_thread(submit) == {}
    async with asyncio.timeout(20):
        [received] = await smtp.wait_for(1)
    assert received.mail_from == "app@submit.example"
    assert sorted(received.rcpt_tos) == ["hidden@example.org", "reader@example.org"]
    assert received.data.replace(b"\r\n", b"\n") == SENT.replace(b"\r\n", b"\n")
    record = await settled_record(store, "submitted-1")
    assert record["status"] == "sent"
    assert record["tags"] == ["gateway:smtp", "welcome", "smtp-test"]


async def test_authentication_and_envelope_refusals_carry_their_codes(
    settings: Settings, smtp: CaptureServer, port: int
) -> None:
    def attempts() -> list[Any]:
        found: list[Any] = []
        with client(port, login=None) as session:
            found.append(session.mail("app@submit.example"))  # no AUTH yet
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as session:
            try:
                session.login(DOMAIN, "wrong key")
            except smtplib.SMTPAuthenticationError as exc:
                found.append(exc.smtp_code)
        with client(port, login=(f"app@{DOMAIN}", API_KEY)) as session:
            session.mail("app@submit.example")
            found.extend(session.rcpt(f"r{i}@example.org")[0] for i in range(4))
            session.rset()
            session.mail("app@submit.example")
            session.rcpt("r@example.org")
            body = (b"x" * 900 + b"\r\n") * 80  # 72 KB in lines SMTP allows
            found.append(session.data(b"Subject: x\r\n\r\n" + body)[0])
        return found

    assert await in_thread(attempts) == [
        (530, b"5.7.0 Authentication required"),
        535,
        250,
        250,
        250,
        452,
        552,
    ]
    assert smtp.received() == []


async def test_steering_fields_schedule_and_refuse(
    settings: Settings, smtp: CaptureServer, store: JobStore, port: int
) -> None:
    later = MESSAGE.replace(
        b"X-Mailbus-Id: submitted-1\r\n",
        b"X-Mailbus-Id: later-1\r\nX-Mailbus-Send-At: 2099-01-01T09:00:00+01:00\r\n",
    )

    def submit(message: bytes) -> tuple[int, bytes]:
        with client(port) as session:
            session.mail("app@submit.example")
            session.rcpt("reader@example.org")
            return session.data(message)

    code, text = await in_thread(submit, later)
    assert (code, text) == (250, b"2.0.0 Queued as later-1")
    async with asyncio.timeout(20):
        while (record := await store.get("later-1")) is None:  # noqa: ASYNC110 (a record)
            await asyncio.sleep(0.05)
    assert record["status"] == "scheduled"
    assert record["due_at"].isoformat().startswith("2099-01-01T08:00:00")
    for bad in (b"X-Mailbus-Delay: soon\r\n", b"X-Mailbus-Typo: 1\r\n"):
        code, text = await in_thread(submit, bad + MESSAGE)
        assert code == 554, text
    foreign = MESSAGE.replace(b"From: App <app@submit.example>", b"From: <ceo@other.example>")
    code, text = await in_thread(submit, foreign.replace(b"submitted-1", b"foreign-1"))
    assert code == 550, text
    await asyncio.sleep(0.5)
    assert smtp.received() == []


async def test_a_message_submitted_twice_is_sent_once(
    smtp: CaptureServer, store: JobStore, port: int
) -> None:
    # Once with its own id, once without one (a client resending after an answer it never
    # got): each pair is one job.
    unnamed = MESSAGE.replace(b"X-Mailbus-Id: submitted-1\r\n", b"").replace(
        b"<one@submit.example>", b"<two@submit.example>"
    )

    def submit(message: bytes) -> None:
        with client(port) as session:
            session.sendmail("app@submit.example", ["reader@example.org"], message)

    for message in (MESSAGE, MESSAGE, unnamed, unnamed):
        await in_thread(submit, message)
    await settled_record(store, "submitted-1")
    async with asyncio.timeout(20):
        await smtp.wait_for(2)
    await asyncio.sleep(1.0)
    ids = sorted(str(mail.message()["Message-ID"]) for mail in smtp.received())
    assert ids == ["<one@submit.example>", "<two@submit.example>"]


async def test_django_send_mail_through_the_gateway(
    settings: Settings, smtp: CaptureServer, port: int
) -> None:
    if not django_settings.configured:
        django_settings.configure()

    def send() -> int:
        connection = get_connection(
            "django.core.mail.backends.smtp.EmailBackend",
            host="127.0.0.1",
            port=port,
            username=DOMAIN,
            password=DOMAIN_KEY,
            use_tls=False,
            timeout=20,
        )
        return send_mail(
            "From Django",
            "Sent by django.core.mail.send_mail.",
            "app@submit.example",
            ["reader@example.org"],
            connection=connection,
            html_message="<p>Sent by <b>Django</b>.</p>",
        )

    assert await in_thread(send) == 1
    async with asyncio.timeout(20):
        [received] = await smtp.wait_for(1)
    message = received.message()
    assert message["Subject"] == "From Django"
    assert message.get_body(("html",)) is not None
    assert received.rcpt_tos == ("reader@example.org",)


async def test_msmtp_as_sendmail_through_the_gateway(
    settings: Settings, smtp: CaptureServer, port: int, tmp_path: Path
) -> None:
    mail = EmailMessage()
    mail["From"] = "app@submit.example"
    mail["To"] = "reader@example.org"
    mail["Subject"] = "From cron"
    mail.set_content("Sent by msmtp, as cron's sendmail.")
    (tmp_path / "mail.eml").write_bytes(bytes(mail))
    command = (
        f"msmtp --host=127.0.0.1 --port={port} --auth=plain --user={DOMAIN} "
        f"--passwordeval='echo {DOMAIN_KEY}' --tls=off --from=app@submit.example "
        f"reader@example.org < {tmp_path / 'mail.eml'}"
    )
    done = await run_with(settings, "sh", "-c", command, kill_after=60)
    assert done.returncode == 0, done.stderr
    async with asyncio.timeout(20):
        [received] = await smtp.wait_for(1)
    assert received.message()["Subject"] == "From cron"


async def test_tls_is_required_before_auth_and_starttls_works(
    settings: Settings, store: JobStore, worker: RunningWorker, smtp: CaptureServer, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    secured = settings.model_copy(
        update={
            "gateway_tls_cert": cert,
            "gateway_tls_key": key,
            "gateway_smtp_loopback_plain_auth": False,
        }
    )
    await DomainStore(store.database).put(DOMAIN, hash_key(DOMAIN_KEY), [], True)
    trusted = ssl.create_default_context(cafile=str(cert))

    def plain_then_tls(port: int) -> tuple[Any, dict[str, Any]]:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as session:
            session.ehlo()
            refused = session.docmd("AUTH", "PLAIN")
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as session:
            session.starttls(context=trusted)
            session.login(DOMAIN, DOMAIN_KEY)
            return refused, session.sendmail("app@submit.example", ["reader@example.org"], MESSAGE)

    async with gateways(secured, smtp=ANY_PORT) as ports:
        refused, failures = await in_thread(plain_then_tls, ports["smtp"])
    assert refused[0] == 530
    assert failures == {}
    async with asyncio.timeout(20):
        await smtp.wait_for(1)


async def test_an_idle_session_is_told_421_when_the_gateway_stops(
    settings: Settings, store: JobStore, worker: RunningWorker
) -> None:
    async with gateways(settings, smtp=ANY_PORT) as ports:
        reader, writer = await asyncio.open_connection("127.0.0.1", ports["smtp"])
        assert (await reader.readline()).startswith(b"220 ")
    async with asyncio.timeout(10):
        said = await reader.read()
    writer.close()
    assert said.startswith(b"421 4.3.2")


async def test_submitted_mail_arrives_dkim_signed_and_verifies(
    settings: Settings, smtp: CaptureServer, port: int
) -> None:
    generated = await mailbus(settings, "domain", "dkim", "generate", DOMAIN)
    assert generated.returncode == 0, generated.stderr
    zone = (await mailbus(settings, "domain", "dkim", "show", DOMAIN)).stdout
    await asyncio.sleep(DOMAIN_CACHE_SECONDS)  # the worker's view of the domain, refreshed

    def submit() -> dict[str, Any]:
        with client(port) as session:
            return session.sendmail("app@submit.example", ["reader@example.org"], MESSAGE)

    assert await in_thread(submit) == {}
    async with asyncio.timeout(20):
        [received] = await smtp.wait_for(1)
    assert received.data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256")
    assert verifies(received.data, zone)
    assert received.data.endswith(SENT.split(b"\r\n\r\n", 1)[1])  # the body as submitted
    assert not verifies(received.data.replace(b"Hello over SMTP", b"Hello over SMTp"), zone)


async def test_implicit_tls_with_auth_login(
    settings: Settings, store: JobStore, worker: RunningWorker, smtp: CaptureServer, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    secured = settings.model_copy(update={"gateway_tls_cert": cert, "gateway_tls_key": key})
    domains = DomainStore(store.database)
    await domains.put(DOMAIN, hash_key(DOMAIN_KEY), [], True)
    assert await domains.add_api_key(DOMAIN, "app", hash_key(API_KEY), MAX_API_KEYS) == "added"
    trusted = ssl.create_default_context(cafile=str(cert))

    def submit(port: int) -> dict[str, Any]:
        with smtplib.SMTP_SSL("127.0.0.1", port, timeout=20, context=trusted) as session:
            session.ehlo()
            session.user, session.password = f"app@{DOMAIN}", API_KEY
            session.auth("LOGIN", session.auth_login)
            return session.sendmail("app@submit.example", ["reader@example.org"], MESSAGE)

    async with gateways(secured, smtps=ANY_PORT) as ports:
        assert await in_thread(submit, ports["smtps"]) == {}
    async with asyncio.timeout(20):
        [received] = await smtp.wait_for(1)
    assert received.message()["Subject"] == "Café by SMTP"
