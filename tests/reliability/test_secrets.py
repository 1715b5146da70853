"""No SMTP password, domain key or secret key ever shows: not in logs, events, dead
letters, ``status``, the other commands' output, metrics or exception messages.
"""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

from aio_pika.abc import AbstractChannel
from pydantic import SecretStr

from consumer.amqp import dead_letters
from consumer.amqp.publish import job_message
from consumer.core.names import Names
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from consumer.vault import new_key
from deploy.devstack.ports import free_port
from deploy.devstack.processes import mailbus, spawn_worker, stop_workers
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import depth, drain_events, job, listen_events, until
from tests.conftest import SMTP_PASSWORD, SMTP_USER
from tests.reliability.accounts import Account, settle
from tests.secret_watch import Watch, watched

USER, PASSWORD = SMTP_USER, SMTP_PASSWORD
WRONG_PASSWORD = watched("pw-Zr9vB4-wrong-one")
DOMAIN_KEY = watched("dk-Hq3nT8-the-domain-key")
STRANGER_KEY = watched("dk-Wd5mJ1-a-stranger-key")


async def add_outbox(
    settings: Settings, server: CaptureServer, domain: str, name: str, password: str, *extra: str
) -> None:
    made = await mailbus(
        settings, "outbox", "add", "--domain", domain, "--name", name, "--host", "127.0.0.1",
        "--port", str(server.port), "--security", "starttls", "--username", USER,
        "--password-stdin", "--timeout", "5", *extra, input=password + "\n",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr


async def test_secrets_never_show(
    settings: Settings,
    channel: AbstractChannel,
    secure: CaptureServer,
    store: JobStore,
    tmp_path: Path,
    ledger: list[Account],
) -> None:
    secret_key = watched(new_key())
    settings = settings.model_copy(
        update={
            "secret_key": SecretStr(secret_key),
            "default_smtp_url": None,
            "max_attempts": 2,
            "log_level": "DEBUG",
            "http_port": free_port(),
        }
    )
    names = Names(settings.prefix)
    registered = await mailbus(
        settings, "domain", "add", "example.com", "--key-stdin", input=DOMAIN_KEY
    )
    assert registered.returncode == 0, registered.stderr
    # Two outboxes take turns: one with a wrong password fails over to the right one.
    await add_outbox(settings, secure, "example.com", "relay", PASSWORD, "--no-verify")
    await add_outbox(settings, secure, "example.com", "wrong", WRONG_PASSWORD, "--no-verify")
    # Certificates are verified unless an outbox says otherwise: this one never sends.
    await add_outbox(settings, secure, "verify.example", "verifying", PASSWORD)
    events = await listen_events(channel, names)
    bodies = {f"secret-{i}": job(subject=f"secret-{i}", domain_key=DOMAIN_KEY) for i in range(6)}
    bodies["stranger"] = job(subject="stranger", domain_key=STRANGER_KEY)
    bodies["unverified"] = job(
        subject="unverified", domain="verify.example", **{"from": "a@verify.example"}
    )
    exchange = await channel.get_exchange(names.exchange)
    for job_id, body in bodies.items():
        await exchange.publish(job_message(body, job_id=job_id), routing_key="send")

    log = tmp_path / "worker.log"
    process = spawn_worker(settings, log)
    try:
        async with asyncio.timeout(60):
            await secure.wait_for(6)

        async def both_dead() -> bool:
            return await depth(channel, names.dead) == 2

        await until(both_dead, seconds=60)
        url = f"http://127.0.0.1:{settings.http_port}/metrics"
        metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
    finally:
        await stop_workers(process)

    outputs = {"log": log.read_text(), "metrics": metrics.decode()}
    commands = {
        "status": ["status"],
        "status --json": ["status", "--json"],
        "outbox ls": ["outbox", "ls"],
        "outbox show": ["outbox", "show", "wrong"],
        "domain show": ["domain", "show", "example.com"],
        "jobs show": ["jobs", "show", "secret-0"],
        "jobs show unverified": ["jobs", "show", "unverified"],
        "dead ls": ["dead", "ls"],
        "dead show": ["dead", "show", "stranger"],
        "config export": ["config", "export"],
    }
    for name, argv in commands.items():
        ran = await mailbus(settings, *argv)
        assert ran.returncode == 0, (name, ran.stderr)
        outputs[name] = ran.stdout + ran.stderr
    outputs["events"] = repr(await drain_events(channel, events))
    queue = await channel.get_queue(names.dead, ensure=False)
    letters: dict[str, str] = {}
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        job_id = dead_letters.read(message).job_id or "?"
        letters[job_id] = repr(message.headers) + message.body.decode()
    outputs["dead letters"] = repr(letters)

    # Each source really holds what it is checked for, so a leak would have shown.
    assert "job.sent" in outputs["log"]
    assert "authentication failed" in outputs["log"]
    assert "CERTIFICATE_VERIFY_FAILED" in outputs["log"]
    assert "mailbus_jobs" in outputs["metrics"]
    assert "mail.sent" in outputs["events"]
    assert "unauthorized" in outputs["events"]
    assert len(letters) == 2, letters
    for secret in (PASSWORD, WRONG_PASSWORD, DOMAIN_KEY, STRANGER_KEY, secret_key):
        leaks = [name for name, text in outputs.items() if secret in text]
        assert not leaks, f"{secret!r} shows in {leaks}"

    received = secure.received()
    account = await settle("secrets", list(bodies), received, dict.fromkeys(letters, "dead"), store)
    ledger.append(account)
    assert (account.sent, account.dead, account.duplicated) == (6, 2, 0)


def test_the_watch_finds_a_secret_once_and_masks_it() -> None:
    watch = Watch(secrets={"pw-Ab12-xyz"})
    watch.read("clean", "nothing here")
    watch.read("log", "AUTH failed for pw-Ab12-xyz")
    watch.read("log", "again pw-Ab12-xyz")
    assert list(watch.found) == [("log", "pw-A…")]
