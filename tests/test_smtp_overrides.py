"""Per-request SMTP servers: the daemon's ``smtpHost``/``smtpUser``/... sealed into the job
by the gateway (``smtp_sealed``) and sent through by the worker, against a real broker,
MongoDB and a second capture server (STARTTLS and AUTH) beside the domain's own.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aio_pika.abc import AbstractChannel
from pydantic import SecretStr

from consumer.amqp.publish import publish_job
from consumer.core import legacy
from consumer.core.message import MAX_SMTP_SEALED, Job
from consumer.core.names import Names
from consumer.core.outboxes import outbox_from_url
from consumer.core.smtp_request import (
    MAX_CREDENTIAL_BYTES,
    MAX_HOST,
    MAX_TIMEOUT,
    metrics_label,
    request_outbox,
    sealed_text,
    smtp_override_url,
)
from consumer.errors import ConfigurationError, GatewayRequestError
from consumer.service.gateway import Listen, check_settings
from consumer.settings import Settings
from consumer.store.domains import hash_key
from consumer.store.jobs import JobStore
from consumer.vault import Vault, new_key
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import drain_events, job, listen_events, take
from tests.conftest import SMTP_PASSWORD, SMTP_USER, RunningWorker, settled_record
from tests.doubles import offline_settings
from tests.secret_watch import watched
from tests.serving import ANY_PORT, gateways

DEFAULT = "smtp://relay:default-pw@smtp.example.com:2525?security=starttls&verify=false"
GATEWAY_PASSWORD = "old password"


def test_a_request_naming_no_server_has_no_override() -> None:
    assert smtp_override_url({"subject": "s"}, default_url=DEFAULT) is None
    # timeout alone was accepted and unused before: it still names no server.
    assert smtp_override_url({"timeout": 5, "smtpHost": ""}, default_url=None) is None


def test_fields_left_out_come_from_the_default_for_its_own_host() -> None:
    url = smtp_override_url(
        {"smtpUser": "user2@example.test", "smtpPassword": "p@ss:/w?rd#", "timeout": 9},
        default_url=DEFAULT,
    )
    assert url is not None
    outbox = outbox_from_url(url)
    assert (outbox.host, outbox.port, outbox.security) == ("smtp.example.com", 2525, "starttls")
    assert (outbox.username, outbox.verify_tls, outbox.timeout) == ("user2@example.test", False, 9)
    assert outbox.password is not None
    assert outbox.password.get_secret_value() == "p@ss:/w?rd#"
    # A new user never gets the default's password; the default's own user does.
    alone = outbox_from_url(smtp_override_url({"smtpUser": "u"}, default_url=DEFAULT) or "")
    assert alone.password is None
    ssl = smtp_override_url({"smtpEncryption": "SSL"}, default_url=DEFAULT)
    same = outbox_from_url(ssl or "")
    assert (same.username, same.security, same.port) == ("relay", "tls", 2525)
    assert same.password is not None
    assert same.password.get_secret_value() == "default-pw"


def test_another_host_starts_afresh_and_never_gets_the_default_credentials() -> None:
    url = smtp_override_url(
        {"smtpHost": "mail.other.example", "smtpEncryption": "ssl"},
        default_url=DEFAULT,
        hosts=["Mail.Other.Example."],
    )
    outbox = outbox_from_url(url or "")
    assert (outbox.host, outbox.port, outbox.security) == ("mail.other.example", 465, "tls")
    assert (outbox.username, outbox.password, outbox.verify_tls) == (None, None, True)
    tls = outbox_from_url(
        smtp_override_url({"smtpHost": "::1", "smtpPort": "26"}, default_url=None, hosts=["::1"])
        or ""
    )
    assert (tls.host, tls.port, tls.security) == ("::1", 26, "starttls")


def test_only_the_default_server_and_the_operators_hosts_can_be_named() -> None:
    for host in ("169.254.169.254", "127.0.0.1", "mail.other.example", "smtp.example.com."):
        fields = {"smtpHost": host, "smtpPort": "25"}
        if host == "smtp.example.com.":  # the default's own host, however written
            assert smtp_override_url(fields, default_url=DEFAULT) is not None
            continue
        with pytest.raises(GatewayRequestError, match="MAILBUS_GATEWAY_SMTP_HOSTS"):
            smtp_override_url(fields, default_url=DEFAULT, hosts=["relay.example"])
    # The same port digits Python would take: not other scripts' digits.
    with pytest.raises(GatewayRequestError, match="smtpPort"):
        smtp_override_url({"smtpPort": "\u00b2"}, default_url=DEFAULT)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"smtpUser": "u", "smtpPassword": "secret-1"}, "no default SMTP server"),
        ({"smtpHost": "a b"}, "smtpHost: not a host name"),
        ({"smtpHost": "h" * (MAX_HOST + 1)}, "smtpHost: a host name"),
        ({"smtpHost": "h", "smtpPassword": "secret-1"}, "smtpPassword: needs smtpUser"),
        ({"smtpHost": "h", "smtpPort": "0"}, "smtpPort: a port number"),
        ({"smtpHost": "h", "smtpPort": True}, "smtpPort: a port number"),
        ({"smtpHost": "h", "smtpEncryption": "starttls"}, "smtpEncryption: 'tls'"),
        ({"smtpHost": "h", "timeout": MAX_TIMEOUT + 1}, "timeout: whole seconds"),
        ({"smtpHost": "h", "smtpUser": "u", "smtpPassword": "secret-1\n"}, "smtpPassword: a"),
        (
            {"smtpHost": "h", "smtpUser": "u", "smtpPassword": "é" * MAX_CREDENTIAL_BYTES},
            "smtpPassword: a string of at most",
        ),
    ],
)
def test_refusals_say_why_and_never_echo_a_value(fields: dict[str, Any], reason: str) -> None:
    with pytest.raises(GatewayRequestError) as refused:
        smtp_override_url(fields, default_url=None, hosts=["h"])
    assert reason in str(refused.value)
    assert "secret-1" not in str(refused.value)


def test_the_largest_request_seals_within_the_job_field() -> None:
    longest = {
        "smtpHost": ".".join(["h" * 63] * 4)[:MAX_HOST],
        "smtpPort": 65535,
        "smtpUser": "\U0001f600" * (MAX_CREDENTIAL_BYTES // 4),
        "smtpPassword": "\U0001f600" * (MAX_CREDENTIAL_BYTES // 4),
        "smtpEncryption": "tls",
        "timeout": MAX_TIMEOUT,
    }
    url = smtp_override_url(
        longest,
        default_url=DEFAULT.replace("smtp.", "x."),
        hosts=[longest["smtpHost"]],
    )
    longest_domain = ".".join(["d" * 63] * 4)[:253]
    token = Vault([new_key()]).encrypt(sealed_text(longest_domain, "x" * 200, url or ""))
    assert len(token) <= MAX_SMTP_SEALED
    assert Job.model_validate(job(smtp_sealed=token)).smtp_sealed == token


def test_the_daemon_job_leaves_the_settings_out_only_when_allowed() -> None:
    mail = {"to": ["a@example.org"], "subject": "s", "body": "b", "smtpHost": "h", "timeout": 3}
    with pytest.raises(GatewayRequestError, match="mailbus outbox add"):
        legacy.daemon_job(mail, domain="d.example", default_from="x@d.example")
    raw = legacy.daemon_job(
        mail, domain="d.example", default_from="x@d.example", smtp_overrides=True
    )
    assert not {"smtpHost", "timeout", "smtp_sealed"} & set(raw)


def test_request_servers_are_one_metrics_label() -> None:
    outbox = request_outbox("smtp://u:p@127.0.0.1:2525?security=none", timeout=7)
    assert (outbox.name, outbox.timeout) == ("request:127.0.0.1:2525", 7)
    assert metrics_label(outbox.name) == "request:*"
    assert (metrics_label("gmail-1"), metrics_label(None)) == ("gmail-1", "")


def test_the_daemon_gateway_needs_a_key_to_seal() -> None:
    on = offline_settings(
        gateway_password_hash=SecretStr("x"),
        gateway_domain="d.example",
        gateway_smtp_overrides=True,
    )
    daemon = Listen("127.0.0.1", 0)
    with pytest.raises(ConfigurationError, match="MAILBUS_SECRET_KEY"):
        check_settings(on, daemon=daemon)
    check_settings(on, daemon=None)  # the REST gateway takes no SMTP settings
    check_settings(on.model_copy(update={"secret_key": SecretStr(new_key())}), daemon=daemon)


# Against the servers.


@pytest.fixture
def sealing(settings: Settings) -> Settings:
    """The test's settings with a secret key; the domain's outbox stays the capture server."""
    return settings.model_copy(update={"secret_key": SecretStr(watched(new_key()))})


def secure_url(secure: CaptureServer) -> str:
    """The STARTTLS + AUTH server as a request would name it (its certificate self-signed)."""
    return (
        f"smtp://{SMTP_USER}:{SMTP_PASSWORD}@127.0.0.1:{secure.port}?security=starttls&verify=false"
    )


async def test_a_sealed_server_gets_the_mail_and_the_record_no_password(
    sealing: Settings, channel: AbstractChannel, smtp: CaptureServer, secure: CaptureServer
) -> None:
    names = Names(sealing.prefix)
    events = await listen_events(channel, names)
    sealed = sealed_text("example.com", "sealed-1", secure_url(secure))
    token = Vault.from_settings(sealing).encrypt(sealed)
    body = job(id="sealed-1", subject="through the request's server", smtp_sealed=token)
    job_id = await publish_job(channel, body, names=names)
    running = RunningWorker(sealing)
    store = JobStore.connect(sealing)
    try:
        async with asyncio.timeout(20):
            [mail] = await secure.wait_for(1)
        record = await settled_record(store, job_id)
    finally:
        await running.shutdown()
        await store.close()
    assert (mail.tls, mail.login) == (True, SMTP_USER)
    assert mail.message()["Subject"] == "through the request's server"
    assert smtp.received() == []  # not the domain's outbox
    outbox = f"request:127.0.0.1:{secure.port}"
    assert (record["status"], record["outbox"]) == ("sent", outbox)
    assert SMTP_PASSWORD not in json.dumps(record, default=str)
    sent = [event for key, event in await drain_events(channel, events) if key == "mail.sent"]
    assert [event["outbox"] for event in sent] == [outbox]
    assert SMTP_PASSWORD not in json.dumps(sent)


async def test_a_token_no_key_opens_is_dead_lettered_invalid(
    sealing: Settings, channel: AbstractChannel, smtp: CaptureServer, secure: CaptureServer
) -> None:
    names = Names(sealing.prefix)
    forged = Vault([new_key()]).encrypt(sealed_text("example.com", "f-1", secure_url(secure)))
    job_id = await publish_job(channel, job(id="f-1", smtp_sealed=forged), names=names)
    running = RunningWorker(sealing)
    try:
        async with asyncio.timeout(20):
            [dead] = await take(channel, names.dead, 1)
    finally:
        await running.shutdown()
    assert dead.headers["x-mailbus-reason"] == "invalid"
    assert "no key in MAILBUS_SECRET_KEY opens it" in str(dead.headers["x-mailbus-error"])
    assert (smtp.received(), secure.received()) == ([], [])
    store = JobStore.connect(sealing)
    record = await store.get(job_id)
    await store.close()
    assert record is not None
    assert (record["status"], record["reason"], record["attempts"]) == ("dead", "invalid", 1)


async def test_a_token_copied_into_another_job_is_dead_lettered(
    sealing: Settings, channel: AbstractChannel, smtp: CaptureServer, secure: CaptureServer
) -> None:
    names = Names(sealing.prefix)
    vault = Vault.from_settings(sealing)
    copies = {
        # Another domain's job, the same domain's other job, and a stored outbox password
        # (the same key encrypts those): none is a server for this job.
        "c-1": vault.encrypt(sealed_text("other.example", "c-1", secure_url(secure))),
        "c-2": vault.encrypt(sealed_text("example.com", "another-job", secure_url(secure))),
        "c-3": vault.encrypt(SMTP_PASSWORD),
    }
    for job_id, token in copies.items():
        await publish_job(channel, job(id=job_id, smtp_sealed=token), names=names)
    running = RunningWorker(sealing)
    try:
        async with asyncio.timeout(20):
            dead = await take(channel, names.dead, 3)
    finally:
        await running.shutdown()
    errors = sorted(str(message.headers["x-mailbus-error"]) for message in dead)
    assert [message.headers["x-mailbus-reason"] for message in dead] == ["invalid"] * 3
    assert errors == [
        "smtp_sealed: not a sealed SMTP server",
        "smtp_sealed: sealed for another job's mail",
        "smtp_sealed: sealed for another job's mail",
    ]
    assert (smtp.received(), secure.received()) == ([], [])


async def test_a_worker_without_a_key_dead_letters_a_sealed_job(
    settings: Settings, channel: AbstractChannel, worker: RunningWorker, smtp: CaptureServer
) -> None:
    names = Names(settings.prefix)
    token = Vault([new_key()]).encrypt(sealed_text("example.com", "k-1", "smtp://127.0.0.1:25"))
    await publish_job(channel, job(smtp_sealed=token), names=names)
    async with asyncio.timeout(20):
        [dead] = await take(channel, names.dead, 1)
    assert dead.headers["x-mailbus-reason"] == "invalid"
    assert "no MAILBUS_SECRET_KEY" in str(dead.headers["x-mailbus-error"])
    assert not worker.task.done()
    assert smtp.received() == []


@pytest.fixture
def daemon_settings(sealing: Settings, smtp: CaptureServer) -> Settings:
    """The daemon gateway with per-request SMTP settings on. The default server is the
    plain capture server on loopback, its URL trusting self-signed certificates: a request
    naming the same host inherits that, one naming another host never would.
    """
    return sealing.model_copy(
        update={
            "gateway_password_hash": SecretStr(hash_key(GATEWAY_PASSWORD)),
            "gateway_domain": "daemon.example",
            "gateway_from": "Old Daemon <daemon@daemon.example>",
            "gateway_wait_seconds": 20.0,
            "gateway_smtp_overrides": True,
            "default_smtp_url": SecretStr(f"{smtp.url}&verify=false"),
        }
    )


@pytest.fixture
async def daemon_port(daemon_settings: Settings, channel: AbstractChannel) -> AsyncIterator[int]:
    """The daemon gateway on a free loopback port, a worker behind it."""
    running = RunningWorker(daemon_settings)
    async with gateways(daemon_settings, daemon=ANY_PORT) as bound:
        yield bound["daemon"]
    await running.shutdown()


async def ask(port: int, request: dict[str, Any]) -> dict[str, Any]:
    """One daemon request; its JSON answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(json.dumps({**request, "auth": GATEWAY_PASSWORD}).encode() + b"\n")
        await writer.drain()
        async with asyncio.timeout(30):
            answer: dict[str, Any] = json.loads(await reader.read())
        return answer
    finally:
        writer.close()


async def test_the_daemon_gateway_sends_through_the_server_a_request_names(
    daemon_settings: Settings,
    smtp: CaptureServer,
    secure: CaptureServer,
    daemon_port: int,
) -> None:
    mail = {
        "to": ["someone@example.org"],
        "subject": "own server",
        "body": "via the request's SMTP server",
        "smtpHost": "127.0.0.1",
        "smtpPort": str(secure.port),
        "smtpUser": SMTP_USER,
        "smtpPassword": SMTP_PASSWORD,
        "smtpEncryption": "tls",
        "timeout": 10,
    }
    answer = await ask(daemon_port, {"sendMail": mail})
    assert (answer["status"], answer["message"]) == ("success", "mail sent successfully")
    [received] = secure.received()  # sent before the answer came back
    assert (received.tls, received.login) == (True, SMTP_USER)
    assert received.message()["Subject"] == "own server"
    assert smtp.received() == []

    store = JobStore.connect(daemon_settings)
    [listed] = await store.find(limit=10)  # the old answer names no id: the one job
    record = await settled_record(store, str(listed["_id"]))
    await store.close()
    assert record["outbox"] == f"request:127.0.0.1:{secure.port}"
    assert SMTP_PASSWORD not in json.dumps(record, default=str)

    # Without a server named, the domain's own outbox (here the default) sends.
    plain = {key: mail[key] for key in ("to", "subject", "body")}
    answer = await ask(daemon_port, {"sendMail": plain})
    assert answer["status"] == "success", answer
    assert len(smtp.received()) == 1
    # A refused setting says why, and nothing is sent.
    refused = await ask(daemon_port, {"sendMail": {**plain, "smtpEncryption": "starttls"}})
    assert (refused["status"], refused["message"]) == ("error", "invalid payload")
    assert "smtpEncryption" in refused["data"]["payload"][0]
