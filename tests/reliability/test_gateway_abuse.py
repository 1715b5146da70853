"""Clients that do not behave, all at once, against ``mailbus gateway serve``: a hundred
daemon connections that say nothing, a hundred that send a megabyte without
authenticating, REST clients dripping their headers and their body, and bursts of wrong
passwords and domain keys. Meanwhile a client that behaves sends its mail through both
gateways; every one of its mails goes out exactly once, every abusive connection is
closed, and the gateway's memory stays within bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections import Counter
from typing import Any

import pytest
from aio_pika.abc import AbstractChannel
from pydantic import SecretStr

from consumer.service.gateway import TOO_MANY_FAILURES
from consumer.settings import Settings
from consumer.store.domains import DomainStore, hash_key
from consumer.store.jobs import JobStore
from deploy.bench.process_stats import MB, peak_rss, usage
from deploy.devstack.processes import settings_env
from deploy.devstack.smtp_capture import CaptureServer
from tests.conftest import RunningWorker
from tests.reliability.accounts import Account, dead_ids, settle
from tests.secret_watch import watched

PASSWORD = watched("gw-Daemon-pass-7Qx")
DOMAIN_KEY = watched("gw-Rest-key-4Lm")
SILENT = 100
OVERSIZE = 100
GUESSES = 50
LEGIT_DAEMON = 20
LEGIT_REST = 10
# The gateway's growth while the connections abuse it: well above what 200 connections
# holding at most 64 KiB each need, far below what they cost before (some 450 MB).
CONNECTIONS_GROWTH_MB = 30
# While the guesses come: each hash is a scrypt of 16 MiB, two at a time here (one for
# each guessing address), a few more in their threads.
GUESSES_GROWTH_MB = 60


@pytest.fixture
def gateway_settings(settings: Settings) -> Settings:
    """The gateways' settings: short timeouts, the default size and failure limits."""
    return settings.model_copy(
        update={
            "gateway_password_hash": SecretStr(hash_key(PASSWORD)),
            "gateway_domain": "daemon.example",
            "gateway_from": "Daemon <daemon@daemon.example>",
            "gateway_header_timeout": 2.0,
            "gateway_read_timeout": 4.0,
            "gateway_wait_seconds": 20.0,
        }
    )


async def daemon(port: int, request: dict[str, Any], source: str) -> dict[str, Any]:
    """One daemon request from the loopback address ``source``; the JSON answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        async with asyncio.timeout(30):
            answer: dict[str, Any] = json.loads(await reader.read())
        return answer
    finally:
        writer.close()


async def rest(port: int, fields: dict[str, str], source: str) -> tuple[int, dict[str, Any]]:
    """One ``PUT /api/mail`` (JSON) from ``source``; the status and the JSON answer."""
    body = json.dumps(fields).encode()
    head = (
        f"PUT /api/mail HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(head + body)
        await writer.drain()
        async with asyncio.timeout(30):
            answer = await reader.read()
        status, _, rest = answer.partition(b"\r\n")
        return int(status.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])
    finally:
        writer.close()


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the gateway closes the connection (whatever it answered first)."""
    try:
        async with asyncio.timeout(30):
            while await reader.read(65536):
                pass
    except ConnectionError:
        pass
    return True


async def silent(port: int) -> bool:
    """Connect and say nothing; True once the gateway has closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await closed(reader)
    finally:
        writer.close()


async def oversize(port: int) -> bool:
    """Send a megabyte of one request without authenticating; True once closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(b'{"sendMail": {"body": "' + b"x" * MB)
            await writer.drain()
        return await closed(reader)
    finally:
        writer.close()


async def drip(port: int, at_once: bytes, dripped: bytes) -> bool:
    """Send ``at_once`` then ``dripped`` a byte every 50 ms; True once the gateway closed
    the connection before it was all sent.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(at_once)
        for byte in dripped:
            await writer.drain()
            try:
                async with asyncio.timeout(0.05):
                    await reader.read(65536)  # an answer (408), or the end
            except TimeoutError:
                writer.write(bytes([byte]))
                continue
            return await closed(reader)
    except ConnectionError:
        return True
    else:
        return False
    finally:
        writer.close()


async def legitimate(ports: dict[str, int], fields: dict[str, str]) -> list[str]:
    """The client that behaves, from 127.0.0.2: a ping, a 200 KB mail (allowed once it
    has authenticated), mails through the daemon and through REST; the subjects sent.
    """
    source = "127.0.0.2"
    ping = await daemon(ports["daemon"], {"ping": None, "auth": PASSWORD}, source)
    assert ping["message"] == "pong", ping
    subjects = []
    for i in range(LEGIT_DAEMON):
        subject = f"daemon-{i:02d}"
        body = "big " * 50_000 if i == 0 else "hello"
        mail = {"to": [f"d{i}@example.org"], "subject": subject, "body": body}
        answer = await daemon(ports["daemon"], {"sendMail": mail, "auth": PASSWORD}, source)
        assert answer["message"] == "mail sent successfully", answer
        subjects.append(subject)
    for i in range(LEGIT_REST):
        subject = f"rest-{i:02d}"
        changed = {**fields, "subject": subject, "to_email": f"r{i}@example.org"}
        status, answer = await rest(ports["rest"], changed, source)
        assert (status, answer["status"]) == (200, "success"), answer
        subjects.append(subject)
    return subjects


@pytest.mark.timeout(120)
async def test_abusive_clients_do_not_stop_the_gateways(
    gateway_settings: Settings,
    smtp: CaptureServer,
    store: JobStore,
    worker: RunningWorker,
    channel: AbstractChannel,
    ledger: list[Account],
) -> None:
    settings = gateway_settings
    await DomainStore(store.database).put("rest.example", hash_key(DOMAIN_KEY), [], True)
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "consumer", "--env-file", os.devnull, "gateway", "serve"),
        *("--rest", "127.0.0.1:0", "--daemon", "127.0.0.1:0"),
        env=settings_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        ports: dict[str, int] = {}
        async with asyncio.timeout(30):
            for name in ("rest", "daemon"):
                line = (await process.stdout.readline()).decode().strip()
                ports[name] = int(line.rsplit(":", 1)[1].split("/", 1)[0])
        fields = {
            "domain": "rest.example",
            "domain_key": DOMAIN_KEY,
            "to_email": "someone@example.org",
            "subject": "s",
            "body": "hello",
            "from_email": "app@rest.example",
        }
        # The password and the domain key are hashed once, before the measures start.
        warm = await daemon(ports["daemon"], {"ping": None, "auth": PASSWORD}, "127.0.0.9")
        assert warm["message"] == "pong"
        status, _ = await rest(ports["rest"], {**fields, "subject": "rest-warm"}, "127.0.0.9")
        assert status == 200
        sent_subjects = ["rest-warm"]
        before = peak_rss(process.pid) / MB

        loop = asyncio.get_running_loop()
        started = loop.time()
        head = b"PUT /api/mail HTTP/1.1\r\nHost: gateway\r\n"
        form = b"Content-Type: application/json\r\nContent-Length: 300\r\n\r\n"
        abuse = [
            *(silent(ports["daemon"]) for _ in range(SILENT)),
            *(oversize(ports["daemon"]) for _ in range(OVERSIZE)),
            drip(ports["rest"], head, b"X-Slow: " + b"a" * 300),
            drip(ports["rest"], head + form, b'{"body": "' + b"a" * 290),
        ]
        abused = asyncio.gather(*abuse)
        sent_subjects += await legitimate(ports, fields)
        legit_seconds = loop.time() - started
        closed_all = await abused
        abuse_seconds = loop.time() - started
        connections_peak = peak_rss(process.pid) / MB

        wrong = {"ping": None, "auth": "not the password"}
        guessed, keyed = await asyncio.gather(
            asyncio.gather(*(daemon(ports["daemon"], wrong, "127.0.0.3") for _ in range(GUESSES))),
            asyncio.gather(
                *(
                    rest(ports["rest"], {**fields, "domain_key": "guess"}, "127.0.0.4")
                    for _ in range(GUESSES // 2)
                )
            ),
        )
        guesses_seconds = loop.time() - started - abuse_seconds
        guesses_peak = peak_rss(process.pid) / MB
        after = usage(process.pid).rss / MB
    finally:
        process.terminate()
        async with asyncio.timeout(30):
            await process.wait()

    async with asyncio.timeout(30):
        await smtp.wait_for(len(sent_subjects))
    await asyncio.sleep(0.5)  # anything sent twice would be in by now
    account = await settle(
        "gateways under abuse",
        sent_subjects,
        smtp.received(),
        await dead_ids(channel, worker.worker.names),
        store,
    )
    daemon_answers = Counter(str(answer["data"]) for answer in guessed)
    rest_answers = Counter(status for status, _ in keyed)
    account.notes = {
        "abusive_connections": len(abuse),
        "abusive_closed": sum(closed_all),
        "abuse_over_seconds": round(abuse_seconds, 1),
        "legitimate_seconds": round(legit_seconds, 1),
        "wrong_passwords": dict(daemon_answers),
        "wrong_domain_keys_by_status": dict(rest_answers),
        "guesses_seconds": round(guesses_seconds, 1),
        "gateway_peak_rss_mb": {
            "before": round(before, 1),
            "after_connections": round(connections_peak, 1),
            "after_guesses": round(guesses_peak, 1),
        },
        "gateway_rss_mb_at_end": round(after, 1),
    }
    ledger.append(account)
    assert (account.published, account.sent) == (1 + LEGIT_DAEMON + LEGIT_REST,) * 2
    assert (account.dead, account.duplicated, account.missing) == (0, 0, [])
    assert all(closed_all)
    failures = settings.gateway_auth_failures
    # Exactly as many guesses were hashed as the limit allows; the rest were not looked at.
    assert daemon_answers == {"None": failures, TOO_MANY_FAILURES: GUESSES - failures}
    assert rest_answers == {200: failures, 429: GUESSES // 2 - failures}
    assert connections_peak - before < CONNECTIONS_GROWTH_MB, account.notes
    assert guesses_peak - connections_peak < GUESSES_GROWTH_MB, account.notes
