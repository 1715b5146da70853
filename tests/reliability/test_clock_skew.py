"""Workers whose clocks disagree by seconds share one provider limit exactly, and hold
no job back: the buckets run on the MongoDB server's clock, and due times are read on it
too (each worker measures its offset to it), so a job one worker put in the delay
ladder is due for the other at the same moment; and a worker whose clock is behind
MongoDB's claims a scheduled job on time, as the claim compares on MongoDB's clock.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aio_pika.abc import AbstractChannel

from consumer.amqp.publish import job_message
from consumer.core.names import Names
from consumer.core.ratelimit import MICROS
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from deploy.bench.rate_limit import consumers, most_in_a_window
from deploy.devstack.processes import mailbus, spawn_worker, stop_workers
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import job, until
from tests.reliability.accounts import Account, dead_ids, settle
from tests.test_rate_limits import add_capped_outbox, token_times

# Debian's libfaketime, under the machine's multiarch directory.
LIBFAKETIME = next(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"), None)
SKEWS = ("+4s", "-4s")
SKEW_SPAN = 8.0  # seconds between the two workers' clocks
PER_SECOND, BURST, JOBS = 5, 2, 40


def clock_offset(log: str) -> float:
    """The offset to MongoDB's clock a worker measured at start, in seconds."""
    for line in log.splitlines():
        if '"worker.clock"' in line:
            return float(json.loads(line)["offset_ms"]) / 1000
    raise AssertionError("the worker did not measure its offset")


def skewed(offset: str) -> dict[str, str]:
    """Environment that shifts a process's wall clock by ``offset`` (libfaketime); its
    monotonic clock, which asyncio runs on, stays true.
    """
    assert LIBFAKETIME is not None, "libfaketime is missing: apt-get install faketime"
    return {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME": offset,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_NO_CACHE": "1",
    }


async def test_skewed_workers_share_one_limit(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    tmp_path: Path,
    ledger: list[Account],
) -> None:
    """Two workers, one 4 s ahead and one 4 s behind, drain 40 jobs through 5/s burst 2:
    never more than 5 + 2 - 1 tokens in any second of MongoDB's clock, both workers
    sending, and no slower than with agreeing clocks: both read due times on MongoDB's.
    """
    names = Names(settings.prefix)
    made = await mailbus(
        settings, "provider", "set", "skewed", "--limit", f"{PER_SECOND}/s",
        "--burst", str(BURST),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    await add_capped_outbox(settings, smtp.url, "skewed")
    workers: list[subprocess.Popen[bytes]] = [
        spawn_worker(settings, tmp_path / f"worker{n}.log", skewed(offset))
        for n, offset in enumerate(SKEWS)
    ]

    async def both_consume() -> bool:
        return await consumers(channel, names.send_queue) == len(SKEWS)

    ids = [f"skew-{i:02d}" for i in range(JOBS)]
    try:
        await until(both_consume, seconds=60)
        exchange = await channel.get_exchange(names.exchange)
        started = asyncio.get_running_loop().time()
        for job_id in ids:
            body = job(subject=job_id)
            await exchange.publish(job_message(body, job_id=job_id), routing_key="send")
        async with asyncio.timeout(90):
            await smtp.wait_for(JOBS)
        elapsed = asyncio.get_running_loop().time() - started
    finally:
        await stop_workers(*workers)
    received = smtp.received()
    account = await settle(
        "clock skew of ±4 s", ids, received, await dead_ids(channel, names), store
    )
    tokens = token_times(tmp_path / f"worker{n}.log" for n in range(len(SKEWS)))
    most = most_in_a_window(tokens, MICROS)
    account.notes = {
        "max_tokens_in_any_1s": most,
        "max_received_in_any_1s": most_in_a_window(
            [round(m.received_at * MICROS) for m in received], MICROS
        ),
        "granted_per_1s": PER_SECOND + BURST - 1,
    }
    ledger.append(account)
    assert (account.sent, account.dead, account.duplicated) == (JOBS, 0, 0)
    assert len(tokens) == JOBS
    assert most == PER_SECOND + BURST - 1, most
    fastest = (JOBS - BURST) / PER_SECOND
    account.notes["seconds"] = round(elapsed, 1)
    account.notes["fastest_seconds"] = fastest
    logs = [(tmp_path / f"worker{n}.log").read_text() for n in range(len(SKEWS))]
    # Nothing waits out the skew: a worker whose clock is 8 s behind the other's would
    # have held every job the other queued for 8 s more.
    assert fastest - 0.1 < elapsed < fastest * 1.25 + 2 < fastest + SKEW_SPAN, elapsed
    offsets = [clock_offset(log) for log in logs]
    assert sorted(round(seconds) for seconds in offsets) == [-4, 4], offsets
    assert all('"job.sent"' in log for log in logs), "a skewed worker sent nothing"


LAGGING_JOBS = 5
LAG = "-4s"
ON_TIME_SECONDS = 1.0


async def test_a_lagging_worker_claims_a_scheduled_job_on_time(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    tmp_path: Path,
    ledger: list[Account],
) -> None:
    """The only worker's clock is 4 s behind MongoDB's: jobs scheduled 3 to 5 s ahead
    still go out on time, not 4 s late, as its claims read due times on MongoDB's clock.
    """
    names = Names(settings.prefix)
    worker = spawn_worker(settings, tmp_path / "worker.log", skewed(LAG))

    async def consuming() -> bool:
        return await consumers(channel, names.send_queue) == 1

    ids = [f"lag-{i}" for i in range(LAGGING_JOBS)]
    due: dict[str, float] = {}
    try:
        await until(consuming, seconds=60)
        exchange = await channel.get_exchange(names.exchange)
        now = datetime.now(UTC)  # this machine's clock, MongoDB's too: it runs here
        for n, job_id in enumerate(ids):
            send_at = now + timedelta(seconds=3 + n / 2)
            due[job_id] = send_at.timestamp()
            body = job(subject=job_id, send_at=send_at.isoformat())
            await exchange.publish(job_message(body, job_id=job_id), routing_key="send")
        async with asyncio.timeout(30):
            await smtp.wait_for(LAGGING_JOBS)
    finally:
        await stop_workers(worker)
    received = smtp.received()
    account = await settle(
        "a worker 4 s behind MongoDB", ids, received, await dead_ids(channel, names), store
    )
    late = [mail.received_at - due[str(mail.message()["Subject"])] for mail in received]
    account.notes = {
        "worker_clock_offset_s": round(clock_offset((tmp_path / "worker.log").read_text()), 1),
        "max_seconds_late": round(max(late), 2),
    }
    ledger.append(account)
    assert (account.sent, account.dead, account.duplicated) == (LAGGING_JOBS, 0, 0)
    assert round(account.notes["worker_clock_offset_s"]) == 4
    assert all(0 <= seconds < ON_TIME_SECONDS for seconds in late), late
