"""The Celery peer's throughput, measured as mailbus's is: a backlog published first,
then the worker (``celery worker``, prefork, concurrency 2) starts and the clock runs
until ``smtp-sink`` has accepted every mail; the same broker, sink and 2 KB mail.

Needs the bench-only dependency Celery (``make bench-deps``).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika

from deploy.bench.mails import bench_job
from deploy.bench.process_stats import MB, cpu_seconds, descendants, usage
from deploy.bench.smtp_sink import SmtpSink

QUEUE = "mailbus-peer"
CONCURRENCY = 2


def _publish(amqp_url: str, jobs: list[dict[str, Any]], port: int) -> None:
    from deploy.bench.celery_app import app

    app.conf.broker_url = amqp_url
    with app.producer_or_acquire() as producer:
        for job in jobs:
            app.send_task(
                "peer.send", args=[job, "127.0.0.1", port], queue=QUEUE, producer=producer
            )


async def _consumers(amqp_url: str) -> int:
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(QUEUE, passive=True)
        return queue.declaration_result.consumer_count or 0


def _start_worker(amqp_url: str, log: Path) -> subprocess.Popen[bytes]:
    """``celery worker`` on the peer's queue, prefork, as its documentation starts it."""
    command = [sys.executable, "-m", "celery", "-A", "deploy.bench.celery_app", "-b", amqp_url]
    command += ["worker", "-Q", QUEUE, "-c", str(CONCURRENCY), "-P", "prefork", "-l", "WARNING"]
    command += ["--without-heartbeat", "--without-gossip", "--without-mingle"]
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=out)


async def measure(
    amqp_url: str,
    sink: SmtpSink,
    count: int,
    size: int,
    log: Path,
    servers: dict[str, list[int]],
) -> dict[str, Any]:
    """Publish ``count`` tasks, start the Celery worker, time the drain into ``sink``;
    the CPU of ``servers`` (pids by role) is reported beside the worker's.
    """
    jobs = [bench_job(f"peer-{uuid.uuid4().hex}", size) for _ in range(count)]
    started = time.perf_counter()
    await asyncio.to_thread(_publish, amqp_url, jobs, sink.port)
    published_in = time.perf_counter() - started
    target = sink.accepted + count
    worker = await asyncio.to_thread(_start_worker, amqp_url, log)
    try:
        async with asyncio.timeout(60):
            while await _consumers(amqp_url) == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        pids = descendants(worker.pid)
        began, cpu = time.perf_counter(), cpu_seconds(pids)
        spent = {role: cpu_seconds(found) for role, found in servers.items()}
        finished = await sink.wait_for(target, 60 + count / 20)
        cpu = cpu_seconds(pids) - cpu
        spent = {role: cpu_seconds(servers[role]) - s for role, s in spent.items()}
        rss = sum(usage(pid).rss for pid in pids)
    finally:
        worker.terminate()
        await asyncio.to_thread(worker.wait, 30)
    seconds = finished - began
    return {
        "pool": f"prefork x{CONCURRENCY}",
        "mails": count,
        "publish_seconds": round(published_in, 2),
        "seconds": round(seconds, 2),
        "mails_per_second": round(count / seconds, 1),
        "cpu_seconds_per_1000_mails": round(cpu / count * 1000, 2),
        "server_cpu_seconds_per_1000_mails": {
            role: round(used / count * 1000, 2) for role, used in spent.items()
        },
        "rss_mb": round(rss / MB, 1),
    }
