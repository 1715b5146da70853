"""A job that takes down every worker that sends it: bounded by its attempts, whatever
route it comes back by (here: the worker dies mid-send, the copy the broker gives back
finds the lease still running and waits it out in the delay ladder, then is claimed
again), it ends in the dead-letter queue with ``delivery_limit``; the other jobs go out.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path

from aio_pika.abc import AbstractChannel

from consumer.amqp.publish import job_message
from consumer.core.names import Names
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from deploy.devstack.processes import spawn_worker, stop_workers
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import job, until
from tests.reliability.accounts import Account, dead_ids, settle, subjects

MAX_ATTEMPTS = 3
HANGS = 100  # more DATA commands hang than the job may ever be tried
POISON = "crash-me"
NORMAL = 10


async def publish(channel: AbstractChannel, names: Names, ids: list[str]) -> None:
    """One job per id, the id as its subject."""
    exchange = await channel.get_exchange(names.exchange)
    for job_id in ids:
        body = job(subject=job_id, to=["rcpt@example.org"])
        await exchange.publish(job_message(body, job_id=job_id), routing_key="send")


async def all_sent(store: JobStore, ids: list[str]) -> bool:
    """Whether every job of ``ids`` is recorded sent."""
    for job_id in ids:
        record = await store.get(job_id)
        if record is None or record["status"] != "sent":
            return False
    return True


async def test_a_job_that_kills_its_worker_every_time_is_dead_lettered_within_its_attempts(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    tmp_path: Path,
    ledger: list[Account],
) -> None:
    """Each time the job's mail is being handed over, its worker is killed (``kill -9``)
    and another started: after ``MAILBUS_MAX_ATTEMPTS`` (3) such attempts the job is dead
    (``delivery_limit``), tried no more than 3 times; the jobs before and after it are sent.
    """
    # A short lease keeps the scenario short: each attempt waits one out in the ladder.
    settings = settings.model_copy(
        update={"lease_seconds": 3.0, "max_attempts": MAX_ATTEMPTS, "smtp_timeout": 30.0}
    )
    names = Names(settings.prefix)
    spawned = 0

    def spawn() -> subprocess.Popen[bytes]:
        nonlocal spawned
        spawned += 1
        return spawn_worker(settings, tmp_path / f"worker{spawned}.log")

    workers = [spawn(), spawn()]
    before = [f"before-{i}" for i in range(NORMAL)]
    after = [f"after-{i}" for i in range(NORMAL)]
    kills = 0
    try:
        await publish(channel, names, before)
        async with asyncio.timeout(60):
            await smtp.wait_for(NORMAL)
        # Killed before its record says sent, a worker's mail would go out again (the one
        # window the docs name): the first jobs are done before any kill.
        await until(lambda: all_sent(store, before), seconds=30)
        # From now on every mail's DATA hangs: the worker sending it is killed meanwhile.
        with smtp.lock:
            smtp.faults.hang_on_data, smtp.faults.hang_seconds = HANGS, 10.0
        await publish(channel, names, [POISON])
        async with asyncio.timeout(60):
            while True:
                record = await store.get(POISON)
                if record is not None and record["status"] == "dead":
                    break
                if smtp.faults.hang_on_data + kills < HANGS:  # a send of it began
                    # Its sender holds the lease: worker ids are host:pid:random.
                    holding = await store.get(POISON)
                    assert holding is not None
                    pid = int(holding["worker"].split(":")[1])
                    victim = next(w for w in workers if w.pid == pid)
                    os.kill(pid, signal.SIGKILL)
                    await asyncio.to_thread(victim.wait, 10)
                    kills += 1
                    workers[workers.index(victim)] = spawn()
                await asyncio.sleep(0.02)
        with smtp.lock:
            tried, smtp.faults.hang_on_data = HANGS - smtp.faults.hang_on_data, 0
        await publish(channel, names, after)
        async with asyncio.timeout(60):
            while len(subjects(smtp.received())) < 2 * NORMAL:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
    finally:
        await stop_workers(*workers)
    ids = [*before, POISON, *after]
    account = await settle(
        "a job that kills its worker", ids, smtp.received(), await dead_ids(channel, names), store
    )
    record = await store.get(POISON)
    assert record is not None
    # The copies the broker gave back found the lease running and waited it out.
    lines = [
        json.loads(line)
        for n in range(1, spawned + 1)
        for line in (tmp_path / f"worker{n}.log").read_text().splitlines()
        if line.startswith("{")
    ]
    waits = [e for e in lines if e.get("job_id") == POISON and e.get("why") == "leased"]
    account.notes = {
        "max_attempts": MAX_ATTEMPTS,
        "workers_killed": kills,
        "sends_begun": tried,
        "recorded_attempts": record["attempts"],
        "lease_waits": len(waits),
    }
    ledger.append(account)
    assert (account.sent, account.dead, account.duplicated) == (2 * NORMAL, 1, 0)
    assert account.dead_reasons == {"delivery_limit": 1}
    assert kills == tried == record["attempts"] == MAX_ATTEMPTS
    assert (record["status"], record["reason"]) == ("dead", "delivery_limit")
    assert waits, "no copy of the job waited for a lease"
