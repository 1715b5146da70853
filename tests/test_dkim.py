"""DKIM: keys kept encrypted per domain, their DNS records, and mail signed by workers
over the bytes the SMTP server receives, checked with dkimpy against the printed record.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import dkim
import pytest
from aio_pika.abc import AbstractChannel
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from consumer.core.dkim import (
    dkim_sign,
    dns_record,
    generate_key,
    public_value,
    read_private_key,
    selector_problem,
    signing_key,
)
from consumer.core.names import Names
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from consumer.vault import Vault, new_key
from deploy.devstack.processes import mailbus
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import encode, job, publish_raw
from tests.conftest import RunningWorker
from tests.secret_watch import watched

DOMAIN_KEY = watched("dk-dkim-staple-0077")
MESSAGE = (
    b"From: Sender <sender@example.com>\r\nTo: rcpt@example.org\r\nSubject: Hi\r\n"
    b"Date: Mon, 1 Jan 2035 00:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n"
    b"List-Unsubscribe: <https://example.com/u>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\r\nHello there\r\n"
)


def records(zone: str) -> dict[bytes, bytes]:
    """The TXT records of zone-file text (as `dkim show` prints), by name: what a
    resolver would answer, the strings joined.
    """
    found = {}
    for line in zone.splitlines():
        if line.startswith(";") or not line.strip():
            continue
        name, rest = line.split(" IN TXT ", 1)
        strings = re.findall(r'"([^"]*)"', rest)
        assert all(len(s) <= 255 for s in strings)
        found[name.encode()] = "".join(strings).encode()
    return found


def verifies(message: bytes, zone: str) -> bool:
    """Whether the first DKIM signature of ``message`` holds against ``zone``'s records."""
    published = records(zone)

    def dns(name: bytes, timeout: float = 5) -> bytes | None:
        return published.get(name)

    return bool(dkim.verify(message, dnsfunc=dns))


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_a_signature_verifies_against_the_printed_record_and_a_changed_body_fails(
    algorithm: Any,
) -> None:
    pem = generate_key(algorithm)
    key = signing_key("Example.com", "s1", pem)
    assert "BEGIN" not in repr(key)
    zone = dns_record("s1", "example.com", public_value(pem))
    assert zone.startswith('s1._domainkey.example.com. IN TXT "v=DKIM1; k=' + algorithm)
    signed = dkim_sign(MESSAGE, key)
    assert signed.endswith(MESSAGE)
    header = signed[: -len(MESSAGE)].decode()
    assert "c=relaxed/relaxed" in header
    assert "d=example.com" in header
    signed_headers = re.search(r"h=([^;]+);", header)
    assert signed_headers is not None
    names = [h.strip() for h in signed_headers.group(1).replace("\r\n", "").split(":")]
    assert names.count("from") == 2  # oversigned: no From can be added
    assert {"subject", "date", "message-id", "list-unsubscribe-post"} <= set(names)
    assert verifies(signed, zone)
    assert not verifies(signed.replace(b"Hello there", b"Hello, there"), zone)
    assert not verifies(signed.replace(b"Subject: Hi", b"Subject: Ho"), zone)


def test_keys_and_selectors_are_checked() -> None:
    pkcs1 = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    algorithm, pkcs8 = read_private_key(pkcs1)
    assert algorithm == "rsa"
    assert pkcs8.startswith(b"-----BEGIN PRIVATE KEY-----")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    for bad, said in (
        (b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n", "not a PEM"),
        (
            small.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"passphrase"),
            ),
            "encrypted",
        ),
        (b"x" * 20_000, "at most"),
    ):
        with pytest.raises(ValueError, match=said):
            read_private_key(bad)
    assert selector_problem("mailbus-20350101") is None
    assert selector_problem("a.b2") is None
    for bad_selector in ("", "-a", "a-", "A", "a_b", "a..b", "a" * 64, "a b"):
        assert selector_problem(bad_selector) is not None, bad_selector


@pytest.fixture
def signed(settings: Settings) -> Settings:
    """The test's settings with a secret key (and the default outbox kept)."""
    return settings.model_copy(update={"secret_key": SecretStr(watched(new_key()))})


async def stored_keys(settings: Settings, domain: str) -> dict[str, str]:
    """The domain's private keys, decrypted, by selector: each now watched for in output."""
    async with JobStore.connect(settings) as jobs:
        doc = await jobs.database["domains"].find_one({"_id": domain})
    assert doc is not None
    vault = Vault.from_settings(settings)
    keys = {}
    for entry in doc.get("dkim_keys", []):
        assert "PRIVATE KEY" not in entry["private_key"]  # encrypted at rest
        keys[entry["selector"]] = watched(vault.decrypt(entry["private_key"]))
    return keys


async def test_generate_show_activate_rm(signed: Settings) -> None:
    unregistered = await mailbus(signed, "domain", "dkim", "generate", "example.com")
    assert unregistered.returncode == 1
    assert "not registered" in unregistered.stderr
    added = await mailbus(signed, "domain", "add", "example.com", "--key-stdin", input=DOMAIN_KEY)
    assert added.returncode == 0, added.stderr
    first = await mailbus(signed, "domain", "dkim", "generate", "Example.com", "--selector", "s1")
    assert first.returncode == 0, first.stderr
    assert "signs the domain's mail from now on" in first.stdout
    second = await mailbus(
        signed, "domain", "dkim", "generate", "example.com", "--selector", "s2",
        "--algorithm", "ed25519",
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert "signs once activated" in second.stdout
    taken = await mailbus(signed, "domain", "dkim", "generate", "example.com", "--selector", "s1")
    assert taken.returncode == 1
    assert "has a DKIM key with selector 's1'" in taken.stderr
    bad = await mailbus(signed, "domain", "dkim", "generate", "example.com", "--selector", "S_1")
    assert bad.returncode == 2

    shown = await mailbus(signed, "domain", "dkim", "show", "example.com")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0] == "; selector s1 (rsa, signs)"
    assert shown.stdout.splitlines()[2] == "; selector s2 (ed25519, waits)"
    published = records(shown.stdout)
    assert set(published) == {b"s1._domainkey.example.com.", b"s2._domainkey.example.com."}
    assert published[b"s1._domainkey.example.com."].startswith(b"v=DKIM1; k=rsa; p=MII")
    keys = await stored_keys(signed, "example.com")
    assert published[b"s1._domainkey.example.com."].decode() == public_value(keys["s1"].encode())
    assert records(first.stdout) == {
        b"s1._domainkey.example.com.": published[b"s1._domainkey.example.com."]
    }
    domain = await mailbus(signed, "domain", "show", "example.com")
    assert '"dkim_selectors": [\n    "s1",\n    "s2"\n  ]' in domain.stdout
    assert '"dkim_active": "s1"' in domain.stdout

    active = await mailbus(signed, "domain", "dkim", "rm", "example.com", "--selector", "s1")
    assert active.returncode == 1
    assert "activate another key first" in active.stderr
    which = await mailbus(signed, "domain", "dkim", "rm", "example.com")
    assert which.returncode == 1
    assert "name one with --selector" in which.stderr
    activated = await mailbus(
        signed, "domain", "dkim", "activate", "example.com", "--selector", "s2"
    )
    assert activated.returncode == 0, activated.stderr
    rotated = await mailbus(signed, "outbox", "rotate-key")
    assert "and 2 DKIM key(s)" in rotated.stdout
    assert await stored_keys(signed, "example.com") == keys
    removed = await mailbus(signed, "domain", "dkim", "rm", "example.com", "--selector", "s1")
    assert removed.returncode == 0, removed.stderr
    last = await mailbus(signed, "domain", "dkim", "rm", "example.com")
    assert last.returncode == 0, last.stderr
    none = await mailbus(signed, "domain", "dkim", "show", "example.com")
    assert none.returncode == 1
    assert "no DKIM key at all" in none.stderr
    for run in (first, second, taken, shown, domain, rotated, removed, last):
        for pem in keys.values():
            assert pem not in run.stdout + run.stderr
            assert pem.splitlines()[1] not in run.stdout + run.stderr


@pytest.fixture
async def workers(signed: Settings, channel: AbstractChannel) -> AsyncIterator[list[RunningWorker]]:
    """Workers for ``signed``, started by the test once its keys are in place."""
    running: list[RunningWorker] = []
    yield running
    for each in running:
        await each.shutdown()


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
async def test_workers_sign_each_attempt_of_a_keyed_domains_mail(
    algorithm: str, signed: Settings, channel: AbstractChannel, smtp: CaptureServer,
    workers: list[RunningWorker],
) -> None:  # fmt: skip
    added = await mailbus(signed, "domain", "add", "example.com", "--key-stdin", input=DOMAIN_KEY)
    assert added.returncode == 0, added.stderr
    generated = await mailbus(
        signed, "domain", "dkim", "generate", "example.com", "--algorithm", algorithm
    )
    assert generated.returncode == 0, generated.stderr
    await stored_keys(signed, "example.com")
    zone = (await mailbus(signed, "domain", "dkim", "show", "example.com")).stdout
    workers.append(RunningWorker(signed))
    names = Names(signed.prefix)

    # The first attempt is refused for now: the second is signed anew, and verifies.
    smtp.faults.refuse_data("451 4.3.0 try again")
    keyed = job(subject="signed", domain_key=DOMAIN_KEY, cc=["cc@example.org"])
    await publish_raw(channel, names, encode(keyed), message_id="retried")
    async with asyncio.timeout(20):
        [mail] = await smtp.wait_for(1)
    async with JobStore.connect(signed) as jobs:
        record = await jobs.get("retried")
    assert record is not None
    assert (record["status"], record["attempts"]) == ("sent", 2)
    assert mail.data.startswith(b"DKIM-Signature: v=1; a=" + algorithm.encode())
    assert mail.data.count(b"DKIM-Signature:") == 1
    assert verifies(mail.data, zone)
    assert not verifies(mail.data.replace(b"Hello there", b"Hello therE"), zone)

    # An open domain has no key: its mail goes unsigned.
    open_job = job(domain="open.example", **{"from": {"email": "a@open.example"}})
    await publish_raw(channel, names, encode(open_job), message_id="open")
    async with asyncio.timeout(20):
        _, plain = await smtp.wait_for(2)
    assert b"DKIM-Signature" not in plain.data


async def test_an_imported_key_signs(
    signed: Settings, channel: AbstractChannel, smtp: CaptureServer, workers: list[RunningWorker]
) -> None:
    pem = watched(
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        .decode()
    )
    await mailbus(signed, "domain", "add", "example.com", "--key-stdin", input=DOMAIN_KEY)
    garbage = await mailbus(signed, "domain", "dkim", "import", "example.com", input="nope\n")
    assert garbage.returncode == 1
    assert "not a PEM private key" in garbage.stderr
    imported = await mailbus(
        signed, "domain", "dkim", "import", "example.com", "--selector", "old", input=pem
    )
    assert imported.returncode == 0, imported.stderr
    assert pem.splitlines()[1] not in imported.stdout + imported.stderr
    zone = (await mailbus(signed, "domain", "dkim", "show", "example.com")).stdout
    workers.append(RunningWorker(signed))
    keyed = job(subject="imported", domain_key=DOMAIN_KEY)
    await publish_raw(channel, Names(signed.prefix), encode(keyed), message_id="imported")
    async with asyncio.timeout(20):
        [mail] = await smtp.wait_for(1)
    assert b" s=old;" in mail.data
    assert verifies(mail.data, zone)
