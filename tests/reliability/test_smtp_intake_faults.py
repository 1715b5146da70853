"""Mail submitted over SMTP while a worker is killed (SIGKILL) and RabbitMQ is killed and
restarted: a client that retries what was not accepted (as every SMTP client does with a
4xx) gets every message sent, each accepted one once (at most the mails a killed worker
had handed over before it could record them come twice: the window the design names).

The scenario has a broker of its own, as the broker faults scenario does.
"""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import subprocess
import time
from collections import Counter
from pathlib import Path

import aio_pika
import pytest
from pydantic import SecretStr

from consumer.amqp import topology
from consumer.core.names import Names
from consumer.settings import Settings
from consumer.store.domains import DomainStore, hash_key
from consumer.store.jobs import JobStore
from consumer.vault import new_key
from deploy.devstack.processes import spawn_worker, stop_workers
from deploy.devstack.rabbitmq import PrivateRabbit
from deploy.devstack.smtp_capture import CaptureServer
from tests.reliability.accounts import Account, dead_ids, settle, subjects
from tests.reliability.test_kill_workers import held_by
from tests.serving import ANY_PORT, gateways

MESSAGES = 100
DOMAIN, KEY = "intake.example", "dk-intake-faults-0042"
# How long a client keeps trying one message (a 4xx, or the connection lost) before it
# gives up: longer than the broker's restart.
GIVE_UP_SECONDS = 90.0
PACE = 0.1  # seconds between two messages: the submissions last about 10 s


def message(job_id: str) -> bytes:
    return (
        f"From: app@{DOMAIN}\r\nTo: reader@example.org\r\nSubject: {job_id}\r\n"
        f"X-Mailbus-Id: {job_id}\r\n\r\nSubmitted over SMTP.\r\n"
    ).encode()


def submit_all(port: int, ids: list[str], answers: Counter[int], accepted: list[str]) -> None:
    """Submit each message until it is accepted (into ``accepted``), as an SMTP client
    does after a 4xx or a lost connection (at most GIVE_UP_SECONDS each), a little apart so
    that the faults land among the submissions.
    """
    for job_id in ids:
        time.sleep(PACE)
        deadline = time.monotonic() + GIVE_UP_SECONDS
        while time.monotonic() < deadline:
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as session:
                    session.login(DOMAIN, KEY)
                    session.sendmail(f"app@{DOMAIN}", ["reader@example.org"], message(job_id))
                answers[250] += 1
                accepted.append(job_id)
                break
            except smtplib.SMTPResponseException as exc:
                answers[exc.smtp_code] += 1
                if exc.smtp_code >= 500:  # refused for good: the account shows it
                    break
            except (smtplib.SMTPServerDisconnected, ConnectionError):
                answers[0] += 1
            time.sleep(0.2)


@pytest.mark.timeout(300)
async def test_smtp_submissions_across_a_worker_kill_and_a_broker_restart(
    settings: Settings,
    own_rabbit: PrivateRabbit,
    smtp: CaptureServer,
    store: JobStore,
    tmp_path: Path,
    ledger: list[Account],
) -> None:
    settings = settings.model_copy(
        update={
            "amqp_url": SecretStr(own_rabbit.amqp_url),
            "secret_key": SecretStr(new_key()),
            "gateway_smtp_loopback_plain_auth": True,
        }
    )
    names = Names(settings.prefix)
    async with await aio_pika.connect(own_rabbit.amqp_url) as connection:
        await topology.declare(await connection.channel(), names, settings.delivery_limit)
    await DomainStore(store.database).put(DOMAIN, hash_key(KEY), [], True)
    smtp.faults.data_delay = 0.01  # slow enough that the faults land mid-run
    workers: list[subprocess.Popen[bytes]] = [
        spawn_worker(settings, tmp_path / f"worker{n}.log") for n in range(2)
    ]
    ids = [f"intake-{i:04d}" for i in range(MESSAGES)]
    answers: Counter[int] = Counter()
    accepted: list[str] = []
    in_flight_at_kill = 0
    try:
        async with gateways(settings, smtp=ANY_PORT) as ports:
            client = asyncio.create_task(
                asyncio.to_thread(submit_all, ports["smtp"], ids, answers, accepted)
            )
            async with asyncio.timeout(60):
                while len(accepted) < 25:  # noqa: ASYNC110 (the client's progress)
                    await asyncio.sleep(0.05)
            victim = workers[0]
            in_flight_at_kill = len(await held_by(store, victim.pid))
            os.kill(victim.pid, signal.SIGKILL)
            workers.append(spawn_worker(settings, tmp_path / "worker2.log"))
            async with asyncio.timeout(60):
                while len(accepted) < 50:  # noqa: ASYNC110 (the client's progress)
                    await asyncio.sleep(0.05)
            await asyncio.to_thread(own_rabbit.stop, True)
            await asyncio.sleep(1)
            await asyncio.to_thread(own_rabbit.start)
            async with asyncio.timeout(200):
                await client
            async with asyncio.timeout(120):
                while len(subjects(smtp.received())) < len(accepted):  # noqa: ASYNC110
                    await asyncio.sleep(0.2)
    finally:
        await stop_workers(*workers)

    async with await aio_pika.connect(settings.amqp_url.get_secret_value()) as connection:
        dead = await dead_ids(await connection.channel(), names)
    account = await settle(
        "SMTP submissions, worker SIGKILL and RabbitMQ restart", ids, smtp.received(), dead, store
    )
    account.notes = {"answers": dict(answers), "in_flight_at_kill": in_flight_at_kill}
    ledger.append(account)
    assert accepted == ids, f"a message was never accepted: {dict(answers)}"
    assert answers[250] == MESSAGES  # and none accepted twice: the client moved on
    assert sum(answers.values()) > MESSAGES, "the faults came after the submissions"
    assert account.settled, account.missing[:10]
    assert (account.sent, account.dead) == (MESSAGES, 0)
    assert account.duplicated <= in_flight_at_kill, account.twice
