"""A flood: tens of thousands of jobs published at once. Each worker holds only its
prefetch, so its memory stays flat whatever the backlog; the broker keeps the rest;
nothing is lost. ``RELIABILITY_FLOOD_JOBS`` sets the size (3,000 by default, to keep
the suite short; tests/README.md reports a 50,000 run).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import aio_pika
import pytest

from consumer.amqp.publish import job_message
from consumer.core.names import Names
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from deploy.bench.process_stats import MB, peak_rss
from deploy.devstack.processes import spawn_worker, stop_workers
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import depth, job
from tests.reliability.accounts import Account, dead_ids, settle, subjects

WORKERS = 2
# Far above what a worker needs to hold its prefetch of 2 KB jobs: a leak or an
# unbounded intake would pass it within the first thousands.
RSS_LIMIT_MB = 150


def flood_size() -> int:
    return int(os.environ.get("RELIABILITY_FLOOD_JOBS", "3000"))


async def publish_flood(settings: Settings, ids: list[str]) -> None:
    """Publish every job, confirms awaited a thousand at a time."""
    names = Names(settings.prefix)
    text = "flood " * 300  # about 2 KB a job
    async with await aio_pika.connect(settings.amqp_url.get_secret_value()) as connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(names.exchange)
        for start in range(0, len(ids), 1000):
            await asyncio.gather(
                *(
                    exchange.publish(
                        job_message(job(subject=job_id, text=text), job_id=job_id),
                        routing_key="send",
                    )
                    for job_id in ids[start : start + 1000]
                )
            )


@pytest.mark.timeout(900)
async def test_a_flood_is_drained_with_flat_memory(
    settings: Settings,
    channel: aio_pika.abc.AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    tmp_path: Path,
    ledger: list[Account],
) -> None:
    names = Names(settings.prefix)
    ids = [f"flood-{i:05d}" for i in range(flood_size())]
    loop = asyncio.get_running_loop()
    started = loop.time()
    await publish_flood(settings, ids)
    published_in = loop.time() - started
    backlog = await depth(channel, names.send_queue)
    workers: list[subprocess.Popen[bytes]] = [
        spawn_worker(settings, tmp_path / f"worker{n}.log") for n in range(WORKERS)
    ]
    try:
        async with asyncio.timeout(800):
            while len(subjects(smtp.received())) < len(ids):  # noqa: ASYNC110
                await asyncio.sleep(0.5)
        drained_in = loop.time() - started - published_in
        peaks = [peak_rss(process.pid) / MB for process in workers]
    finally:
        await stop_workers(*workers)
    account = await settle(
        f"flood of {len(ids)}", ids, smtp.received(), await dead_ids(channel, names), store
    )
    account.notes = {
        "publish_seconds": round(published_in, 1),
        "queued_at_once": backlog,
        "drain_seconds": round(drained_in, 1),
        "worker_peak_rss_mb": [round(p, 1) for p in peaks],
    }
    ledger.append(account)
    assert backlog >= len(ids) * 0.99  # it really was all waiting at once
    assert (account.sent, account.dead, account.duplicated) == (len(ids), 0, 0)
    assert max(peaks) < RSS_LIMIT_MB, peaks
