"""``kill -9`` of worker processes at random moments while three drain a backlog."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
from pathlib import Path

from aio_pika.abc import AbstractChannel

from consumer.publish import job_message
from consumer.settings import Settings
from consumer.store import JobStore
from consumer.topology import Names
from deploy.devstack.processes import spawn_worker, stop_workers
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import job
from tests.reliability.accounts import Account, dead_ids, settle, subjects

JOBS = 2000
WORKERS = 3
KILLS = 6


async def test_kill_9_while_three_workers_drain_a_backlog(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    tmp_path: Path,
    ledger: list[Account],
) -> None:
    """Every job is sent, none is dead; a duplicate can only be a mail the SMTP server
    accepted just before its worker died, before the "sent" write (counted, reported).
    """
    # A short lease: a dead worker's claims are taken over in seconds, not minutes.
    settings = settings.model_copy(update={"lease_seconds": 3.0})
    names = Names(settings.prefix)
    seed = random.randrange(1 << 30)
    chance = random.Random(seed)
    exchange = await channel.get_exchange(names.exchange)
    ids = [f"kill-{i:04d}" for i in range(JOBS)]
    for job_id in ids:
        body = job(subject=job_id, to=["rcpt@example.org"])
        await exchange.publish(job_message(body, job_id=job_id), routing_key="send")

    def spawn(n: int) -> subprocess.Popen[bytes]:
        return spawn_worker(settings, tmp_path / f"worker{n}.log")

    workers = [spawn(n) for n in range(WORKERS)]
    spawned = WORKERS
    kills: list[int] = []
    try:
        for _ in range(KILLS):
            await asyncio.sleep(chance.uniform(0.5, 2.0))
            sent = len(smtp.received())
            if sent >= JOBS:
                break
            victim = chance.randrange(WORKERS)
            os.kill(workers[victim].pid, signal.SIGKILL)
            await asyncio.to_thread(workers[victim].wait, 10)
            kills.append(sent)
            workers[victim] = spawn(spawned)
            spawned += 1
        async with asyncio.timeout(90):
            while len(subjects(smtp.received())) < JOBS:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
    finally:
        await stop_workers(*workers)

    account = await settle(
        "kill -9 of workers", ids, smtp.received(), await dead_ids(channel, names), store
    )
    account.notes = {"kills": len(kills), "killed_after_sent": kills, "seed": seed}
    ledger.append(account)
    assert len(kills) >= KILLS // 2, f"the backlog drained before the kills: {kills}"
    assert account.settled, account.missing[:10]
    assert (account.sent, account.dead) == (JOBS, 0)
    # Only a job its worker held when it died can go twice: at most its prefetch.
    assert account.duplicated <= len(kills) * settings.prefetch, account.twice
    records = [await store.get(job_id) for job_id in ids]
    assert {r["status"] for r in records if r} == {"sent"}
