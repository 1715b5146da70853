"""Outboxes in MongoDB: round robin across them, disabled ones idle, passwords never in clear."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from aio_pika.abc import AbstractChannel
from pydantic import SecretStr

from consumer.amqp.publish import publish_job
from consumer.clock import utcnow
from consumer.core.names import Names
from consumer.core.outboxes import outbox_from_url
from consumer.errors import ConfigurationError
from consumer.settings import Settings
from consumer.store import outboxes as outboxes_module
from consumer.store.jobs import JobStore
from consumer.store.outboxes import OutboxStore, outbox_document, outbox_from_document
from consumer.vault import Vault, new_key
from deploy.devstack.ports import free_port
from deploy.devstack.processes import mailbus
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import depth, job, take
from tests.conftest import RunningWorker
from tests.secret_watch import watched


@pytest.fixture
def servers() -> Iterator[list[CaptureServer]]:
    """Three more SMTP servers, one per outbox."""
    started = [CaptureServer() for _ in range(3)]
    for server in started:
        server.start()
    yield started
    for server in started:
        server.stop()


async def add_outbox(settings: Settings, name: str, url: str, active: bool = True) -> None:
    """Store an outbox for example.com that sends to the SMTP server at ``url``."""
    async with JobStore.connect(settings) as jobs:
        outboxes = OutboxStore(jobs.database)
        outbox = outbox_from_url(url, name=name, timeout=3.0)
        doc = outbox_document(outbox, "example.com", None, None, utcnow())
        assert await outboxes.put(doc, replace=False)
        if not active:
            assert await outboxes.set_active(name, False)


async def test_outboxes_take_turns_and_a_disabled_one_sends_nothing(
    keyed: Settings, channel: AbstractChannel, servers: list[CaptureServer]
) -> None:
    first, second, disabled = servers
    await add_outbox(keyed, "a", first.url)
    await add_outbox(keyed, "b", second.url)
    await add_outbox(keyed, "c", disabled.url, active=False)
    names = Names(keyed.prefix)
    for i in range(20):
        await publish_job(channel, job(subject=f"turn {i}"), names=names)
    running = RunningWorker(keyed)
    try:
        async with asyncio.timeout(30):
            while len(first.received()) + len(second.received()) < 20:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        await running.shutdown()
    assert (len(first.received()), len(second.received()), len(disabled.received())) == (10, 10, 0)
    listing = await mailbus(keyed, "outbox", "ls", "--domain", "example.com")
    rows = [line.split() for line in listing.stdout.splitlines()[1:]]
    assert [(r[0], r[6], r[7]) for r in rows] == [
        ("a", "yes", "10"),
        ("b", "yes", "10"),
        ("c", "no", "0"),
    ]


async def test_no_outbox_and_no_default_is_dead_lettered(
    keyed: Settings, channel: AbstractChannel, smtp: CaptureServer
) -> None:
    names = Names(keyed.prefix)
    await publish_job(channel, job(domain="nowhere.example"), names=names)
    running = RunningWorker(keyed)
    try:
        async with asyncio.timeout(20):
            [dead] = await take(channel, names.dead, 1)
    finally:
        await running.shutdown()
    assert dead.headers["x-mailbus-reason"] == "no_outbox"
    assert smtp.received() == []


async def test_passwords_are_stored_encrypted_and_never_printed(
    keyed: Settings, smtp: CaptureServer
) -> None:
    secret = watched("hunter2-outbox-secret")
    add = await mailbus(
        keyed,
        "outbox", "add", "--domain", "Example.com", "--name", "gmail-1", "--provider", "gmail",
        "--host", "127.0.0.1", "--port", str(smtp.port), "--security", "none",
        "--username", "mailer", "--password-stdin",
        input=secret + "\n",
    )  # fmt: skip
    assert add.returncode == 0, add.stderr
    async with JobStore.connect(keyed) as jobs:
        raw = await jobs.database["outboxes"].find_one({"_id": "gmail-1"})
    assert raw is not None
    assert secret not in json.dumps(raw, default=str)
    assert raw["domain"] == "example.com"
    opened = outbox_from_document(raw, Vault.from_settings(keyed))
    assert opened.password is not None
    assert opened.password.get_secret_value() == secret

    shown = await mailbus(keyed, "outbox", "show", "gmail-1")
    listed = await mailbus(keyed, "outbox", "ls")
    assert json.loads(shown.stdout)["password"] == "set"
    assert secret not in shown.stdout + listed.stdout + shown.stderr + listed.stderr
    again = await mailbus(
        keyed, "outbox", "add", "--domain", "example.com", "--name", "gmail-1", "--host", "h"
    )
    assert again.returncode == 1
    assert "exists" in again.stderr

    without_key = keyed.model_copy(update={"secret_key": None})
    refused = await mailbus(
        without_key, "outbox", "add", "--domain", "example.com", "--name", "x",
        "--host", "h", "--password-stdin", input="pw\n",
    )  # fmt: skip
    assert refused.returncode == 2
    assert "MAILBUS_SECRET_KEY" in refused.stderr


async def test_outbox_test_enable_disable_and_rm(keyed: Settings, smtp: CaptureServer) -> None:
    for name, port in (("up", smtp.port), ("down", free_port())):
        added = await mailbus(
            keyed, "outbox", "add", "--domain", "example.com", "--name", name,
            "--host", "127.0.0.1", "--port", str(port), "--security", "none", "--timeout", "3",
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
    ok = await mailbus(keyed, "outbox", "test", "up")
    assert (ok.returncode, ok.stdout.split()[0]) == (0, "OK")
    assert smtp.quits == 1  # it said goodbye
    failed = await mailbus(keyed, "outbox", "test", "down")
    assert (failed.returncode, failed.stdout.split()[0]) == (1, "FAILED")

    assert (await mailbus(keyed, "outbox", "disable", "up")).returncode == 0
    assert (await mailbus(keyed, "outbox", "enable", "up")).returncode == 0
    assert (await mailbus(keyed, "outbox", "rm", "down")).returncode == 0
    gone = await mailbus(keyed, "outbox", "rm", "down")
    assert gone.returncode == 1
    assert "no outbox 'down'" in gone.stderr


def test_vault_rotation_and_errors() -> None:
    old, new = new_key(), new_key()
    token = Vault([old]).encrypt("s3cret")
    both = Vault([new, old])
    assert both.decrypt(token) == "s3cret"
    rotated = both.rotate(token)
    assert Vault([new]).decrypt(rotated) == "s3cret"
    with pytest.raises(ConfigurationError, match="cannot be decrypted"):
        Vault([new]).decrypt(token)
    with pytest.raises(ConfigurationError, match="not set"):
        Vault([])
    with pytest.raises(ConfigurationError, match="Fernet keys"):
        Vault(["not-a-key"])


async def test_rotate_key_re_encrypts_stored_passwords(keyed: Settings) -> None:
    added = await mailbus(
        keyed, "outbox", "add", "--domain", "example.com", "--name", "r1",
        "--host", "h", "--password-stdin", input="pw-to-rotate\n",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    newer = new_key()
    assert keyed.secret_key is not None
    old = keyed.secret_key.get_secret_value()
    both = keyed.model_copy(update={"secret_key": SecretStr(f"{newer},{old}")})
    rotated = await mailbus(both, "outbox", "rotate-key")
    assert rotated.returncode == 0, rotated.stderr
    assert "re-encrypted 1" in rotated.stdout
    async with JobStore.connect(keyed) as jobs:
        raw = await jobs.database["outboxes"].find_one({"_id": "r1"})
    assert raw is not None
    opened = outbox_from_document(raw, Vault([newer]))  # the old key is no longer needed
    assert opened.password is not None
    assert opened.password.get_secret_value() == "pw-to-rotate"


async def test_jobs_fail_over_from_an_outbox_that_refuses_connections(
    keyed: Settings, channel: AbstractChannel, servers: list[CaptureServer], store: JobStore
) -> None:
    working = servers[0]
    await add_outbox(keyed, "a-down", f"smtp://127.0.0.1:{free_port()}?security=none")
    await add_outbox(keyed, "b-up", working.url)
    names = Names(keyed.prefix)
    ids = [await publish_job(channel, job(subject=f"f{i}"), names=names) for i in range(4)]
    running = RunningWorker(keyed)
    try:
        async with asyncio.timeout(30):
            await working.wait_for(4)
    finally:
        await running.shutdown()
    records = [await store.get(job_id) for job_id in ids]
    assert all(r is not None and (r["status"], r["outbox"]) == ("sent", "b-up") for r in records)
    failed_over = [r for r in records if r is not None and r["attempts"] == 2]
    assert failed_over  # the turns that fell on a-down were retried on b-up, once each
    assert all("Connect" in str(r["last_error"]) for r in failed_over)
    assert await depth(channel, names.dead) == 0


async def test_a_sole_outbox_is_read_once_a_moment_and_several_every_time(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outboxes_module, "SOLE_OUTBOX_SECONDS", 0.3)
    outboxes = OutboxStore(store.database)
    commands = store.commands.counts
    url = "smtp://127.0.0.1:2525"

    async def put(name: str, domain: str) -> None:
        doc = outbox_document(outbox_from_url(url, name=name), domain, None, None, utcnow())
        assert await outboxes.put(doc, replace=False)

    await put("only", "sole.example")
    assert [d["_id"] for d in await outboxes.active("sole.example")] == ["only"]
    before = commands().get("find", 0)
    assert [d["_id"] for d in await outboxes.active("Sole.Example")] == ["only"]
    assert commands().get("find", 0) == before  # answered from memory
    # A change reaches the worker once the moment is over.
    assert await outboxes.set_active("only", False)
    assert [d["_id"] for d in await outboxes.active("sole.example")] == ["only"]
    await asyncio.sleep(0.35)
    assert await outboxes.active("sole.example") == []

    await put("one", "pair.example")
    await put("two", "pair.example")
    assert len(await outboxes.active("pair.example")) == 2
    before = commands().get("find", 0)
    assert len(await outboxes.active("pair.example")) == 2
    assert commands().get("find", 0) == before + 1  # several: read every time
