"""Outboxes with STARTTLS and AUTH, against an aiosmtpd server with a test certificate."""

from __future__ import annotations

import asyncio

import pytest
from aio_pika.abc import AbstractChannel
from pydantic import SecretStr

from consumer.amqp.publish import publish_job
from consumer.core.names import Names
from consumer.settings import Settings
from consumer.vault import new_key
from deploy.devstack.processes import mailbus
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import job
from tests.conftest import SMTP_PASSWORD, SMTP_USER, RunningWorker

USER, PASSWORD = SMTP_USER, SMTP_PASSWORD


@pytest.fixture
def keyed(settings: Settings) -> Settings:
    """Settings with a secret key and no default outbox."""
    return settings.model_copy(
        update={"secret_key": SecretStr(new_key()), "default_smtp_url": None}
    )


async def add(
    settings: Settings, server: CaptureServer, name: str, password: str, *extra: str
) -> None:
    """``mailbus outbox add`` for a STARTTLS + AUTH outbox of example.com."""
    result = await mailbus(
        settings, "outbox", "add", "--domain", "example.com", "--name", name,
        "--host", "127.0.0.1", "--port", str(server.port), "--security", "starttls",
        "--username", USER, "--password-stdin", "--timeout", "5", *extra,
        input=password + "\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


async def test_outbox_test_checks_tls_and_credentials(
    keyed: Settings, secure: CaptureServer
) -> None:
    await add(keyed, secure, "trusting", PASSWORD, "--no-verify")
    await add(keyed, secure, "wrong-password", "not it", "--no-verify")
    await add(keyed, secure, "verifying", PASSWORD)

    ok = await mailbus(keyed, "outbox", "test", "trusting")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("OK trusting (127.0.0.1:")
    assert f"AUTH as {USER}" in ok.stdout

    refused = await mailbus(keyed, "outbox", "test", "wrong-password")
    assert refused.returncode == 1
    assert "SMTPAuthenticationError" in refused.stdout
    assert "not it" not in refused.stdout + refused.stderr

    # Certificates are verified unless the outbox says otherwise: self-signed is refused.
    untrusted = await mailbus(keyed, "outbox", "test", "verifying")
    assert untrusted.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stdout


async def test_mail_goes_out_over_starttls_with_auth(
    keyed: Settings, channel: AbstractChannel, secure: CaptureServer
) -> None:
    await add(keyed, secure, "relay", PASSWORD, "--no-verify")
    await publish_job(channel, job(subject="encrypted"), names=Names(keyed.prefix))
    running = RunningWorker(keyed)
    try:
        async with asyncio.timeout(20):
            [mail] = await secure.wait_for(1)
    finally:
        await running.shutdown()
    assert (mail.tls, mail.login) == (True, USER)
    assert mail.message()["Subject"] == "encrypted"
