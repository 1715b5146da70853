"""End-to-end throughput: a backlog of jobs published first, then worker processes start
and the clock runs until Postfix's ``smtp-sink`` has accepted every mail. Measured beside
it, in the same run, the references: ``smtp-source`` into the same sink (the machine's C
ceiling) and a bare aiosmtplib loop sending the same bytes (the Python client's ceiling).

Per run: mails per second, MongoDB commands per mail (the workers' own count), AMQP bytes
per mail (the broker's count for the workers' connections), peak RSS and CPU seconds per
1,000 mails. A soak run reports RSS idle, after its first round and after its last.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import httpx
from prometheus_client.parser import text_string_to_metric_families

from consumer.amqp import topology
from consumer.amqp.publish import job_message, jobs_exchange
from consumer.amqp.queue_stats import management_request
from consumer.clock import utcnow
from consumer.core.names import SEND_KEY, Names
from consumer.core.outboxes import outbox_from_url
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from consumer.store.outboxes import OutboxStore, outbox_document
from deploy.bench.mails import DOMAIN, bench_job, wire_bytes
from deploy.bench.process_stats import MB, cpu_seconds, usage
from deploy.bench.smtp_sink import SmtpSink, smtp_source
from deploy.devstack.ports import free_port
from deploy.devstack.processes import spawn_worker

PUBLISH_CHUNK = 500
# The broker's connection statistics are refreshed every second (collect_statistics_interval).
STATS_SETTLE = 1.5
# How long the soak keeps a sent job's record: what a TTL index does in production over
# days, the soak does between rounds, so that the database stays the size it would.
SOAK_RETENTION_SECONDS = 30.0
# Dropping a database of 100,000 records takes the test server longer than a mail's
# timeout.
DROP_TIMEOUT = 300.0


@dataclass(frozen=True)
class Stack:
    """Where the benchmark's broker, store and sink are, and where logs go; ``settings``
    are the workers' (without a default outbox: each run registers the sink as one).
    """

    settings: Settings
    management_url: str
    sink: SmtpSink
    base: Path
    # The processes sharing the machine with the workers, by role: whose CPU each run
    # reports beside the workers', to show what bounds the throughput.
    servers: dict[str, list[int]]
    # Run the database's TTL sweep now, returning how many records it removed.
    prune_expired: Callable[[], int]


async def register_outbox(settings: Settings, url: str) -> None:
    """Give the benchmark's domain one outbox (no provider limit), as an operator would."""
    async with JobStore.connect(settings) as jobs:
        doc = outbox_document(outbox_from_url(url, name="sink"), DOMAIN, None, None, utcnow())
        await OutboxStore(jobs.database).put(doc, replace=True)


async def drop_database(settings: Settings) -> None:
    """Drop a run's database: the test server slows down as its collections grow."""
    patient = settings.model_copy(update={"store_timeout": DROP_TIMEOUT})
    async with JobStore.connect(patient) as jobs:
        await jobs.client.drop_database(settings.mongo_db)


async def publish_backlog(settings: Settings, jobs: Sequence[dict[str, Any]]) -> float:
    """Declare the topology and publish ``jobs`` with confirms; seconds it took."""
    names = Names(settings.prefix)
    async with await aio_pika.connect(settings.amqp_url.get_secret_value()) as connection:
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare(channel, names, settings.delivery_limit)
        exchange = await jobs_exchange(channel, names)
        started = time.perf_counter()
        for first in range(0, len(jobs), PUBLISH_CHUNK):
            chunk = jobs[first : first + PUBLISH_CHUNK]
            await asyncio.gather(
                *(exchange.publish(job_message(j), routing_key=SEND_KEY) for j in chunk)
            )
        return time.perf_counter() - started


async def _consumers(settings: Settings) -> int:
    names = Names(settings.prefix)
    async with await aio_pika.connect(settings.amqp_url.get_secret_value()) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(names.send_queue, passive=True)
        return queue.declaration_result.consumer_count or 0


async def _mongo_commands(port: int) -> Counter[str]:
    """The worker's ``mailbus_mongo_commands_total``, by command."""
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    return Counter(
        {
            sample.labels["command"]: round(sample.value)
            for family in text_string_to_metric_families(text)
            if family.name == "mailbus_mongo_commands"
            for sample in family.samples
        }
    )


async def _opcounters(settings: Settings) -> Counter[str]:
    """The database server's operation counters (documents inserted, update statements,
    queries, commands...), whoever sent them.
    """
    async with JobStore.connect(settings) as jobs:
        status = await jobs.client.admin.command("serverStatus")
    return Counter({name: int(count) for name, count in status["opcounters"].items()})


async def _amqp_octets(stack: Stack) -> int:
    """Bytes in both directions on the workers' AMQP connections, as the broker counts."""
    base, auth = management_request(
        stack.management_url, stack.settings.amqp_url.get_secret_value()
    )
    async with httpx.AsyncClient(timeout=10, auth=auth) as client:
        response = await client.get(f"{base}api/connections")
    response.raise_for_status()
    return sum(
        int(c.get("recv_oct", 0)) + int(c.get("send_oct", 0))
        for c in response.json()
        if str(c.get("client_properties", {}).get("connection_name", "")).startswith(
            "mailbus worker"
        )
    )


class Workers:
    """``mailbus worker`` processes, each serving its metrics on a port of its own."""

    def __init__(self, stack: Stack, settings: Settings, count: int, tag: str) -> None:
        self.ports = [free_port() for _ in range(count)]
        self.processes: list[subprocess.Popen[bytes]] = [
            spawn_worker(
                settings.model_copy(update={"http_port": port}),
                stack.base / f"{tag}-worker{i}.log",
            )
            for i, port in enumerate(self.ports)
        ]
        self.settings = settings

    async def consuming(self) -> None:
        """Wait until every worker consumes the send queue."""
        async with asyncio.timeout(120):
            while await _consumers(self.settings) < len(self.processes):  # noqa: ASYNC110
                await asyncio.sleep(0.05)

    def cpu_seconds(self) -> float:
        """CPU seconds the workers used so far, together."""
        return sum(usage(p.pid).cpu_seconds for p in self.processes)

    def rss(self) -> int:
        """The largest RSS among the workers now."""
        return max(usage(p.pid).rss for p in self.processes)

    async def mongo_commands(self) -> Counter[str]:
        """MongoDB commands the workers sent so far, together, by command."""
        total: Counter[str] = Counter()
        for port in self.ports:
            total.update(await _mongo_commands(port))
        return total

    async def stop(self) -> None:
        """SIGTERM each and wait for it."""
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            await asyncio.to_thread(process.wait, 60)


async def _watch_rss(workers: Workers, peak: list[int], done: asyncio.Event) -> None:
    while not done.is_set():
        peak[0] = max(peak[0], workers.rss())
        await asyncio.sleep(0.25)


async def run(
    stack: Stack,
    tag: str,
    workers: int,
    count: int,
    size: int,
    attachment: Path | None = None,
) -> dict[str, Any]:
    """Publish ``count`` jobs, start ``workers`` workers, time the drain into the sink."""
    settings = stack.settings.model_copy(update={"prefix": tag, "mongo_db": tag})
    await register_outbox(settings, stack.sink.url)
    jobs = [bench_job(f"{tag}-{uuid.uuid4().hex}", size, attachment) for _ in range(count)]
    published_in = await publish_backlog(settings, jobs)
    target = stack.sink.accepted + count
    running = Workers(stack, settings, workers, tag)
    peak, done = [0], asyncio.Event()
    try:
        await running.consuming()
        started = time.perf_counter()
        commands, cpu, octets, operations = (
            await running.mongo_commands(),
            running.cpu_seconds(),
            await _amqp_octets(stack),
            await _opcounters(settings),
        )
        servers = {role: cpu_seconds(pids) for role, pids in stack.servers.items()}
        watcher = asyncio.create_task(_watch_rss(running, peak, done))
        finished = await stack.sink.wait_for(target, 60 + count / 20)
        done.set()
        await watcher
        cpu = running.cpu_seconds() - cpu
        servers = {role: cpu_seconds(stack.servers[role]) - s for role, s in servers.items()}
        commands = await running.mongo_commands() - commands
        operations = await _opcounters(settings) - operations
        await asyncio.sleep(STATS_SETTLE)
        octets = await _amqp_octets(stack) - octets
    finally:
        done.set()
        await running.stop()
        await drop_database(settings)
    seconds = finished - started
    return {
        "workers": workers,
        "mails": count,
        "message_bytes": len(wire_bytes(jobs[0])),
        "publish_seconds": round(published_in, 2),
        "seconds": round(seconds, 2),
        "mails_per_second": round(count / seconds, 1),
        "mongo_commands_per_mail": round(commands.total() / count, 3),
        "mongo_commands_by_name": dict(sorted(commands.items())),
        # The server's count: documents inserted, update and delete statements, queries.
        "mongo_operations_per_mail": {
            name: round(n / count, 3) for name, n in sorted(operations.items()) if n
        },
        "amqp_bytes_per_mail": round(octets / count),
        "peak_rss_mb": round(peak[0] / MB, 1),
        "cpu_seconds_per_1000_mails": round(cpu / count * 1000, 2),
        "server_cpu_seconds_per_1000_mails": {
            role: round(spent / count * 1000, 2) for role, spent in servers.items()
        },
    }


async def aiosmtplib_loop(stack: Stack, count: int, connections: int, message: bytes) -> float:
    """The bare aiosmtplib loop's mails per second, in a process of its own."""
    path = stack.base / "loop-message.eml"
    path.write_bytes(message)
    command = [sys.executable, "-m", "deploy.bench.smtp_loop", "--port", str(stack.sink.port)]
    command += ["--count", str(count), "--connections", str(connections), "--message", str(path)]
    process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
    async with asyncio.timeout(600):
        out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError("the aiosmtplib loop failed")
    return float(json.loads(out)["mails_per_second"])


async def references(stack: Stack, count: int, connections: int, size: int) -> dict[str, Any]:
    """The C and Python ceilings for ``count`` mails of ``size`` bytes."""
    message = wire_bytes(bench_job("reference", size))
    before = stack.sink.accepted
    c_rate = await smtp_source(stack.sink.port, count, connections, size)
    python_rate = await aiosmtplib_loop(stack, count, connections, message)
    await stack.sink.wait_for(before + 2 * count, 30)
    return {
        "mails": count,
        "connections": connections,
        "smtp_source_per_second": round(c_rate, 1),
        "aiosmtplib_loop_per_second": round(python_rate, 1),
    }


async def soak(stack: Stack, mails: int, rounds: int, size: int) -> dict[str, Any]:
    """One worker takes ``mails`` in ``rounds`` backlogs; its RSS idle, after the first
    round and after the last, its CPU per 1,000 mails, and each round's rate. Records
    older than :data:`SOAK_RETENTION_SECONDS` are swept between rounds, as retention does.
    """
    settings = stack.settings.model_copy(
        update={
            "prefix": "soak",
            "mongo_db": "soak",
            "retention_days": SOAK_RETENTION_SECONDS / 86400,
        }
    )
    await register_outbox(settings, stack.sink.url)
    await publish_backlog(settings, [])
    running = Workers(stack, settings, 1, "soak")
    per_round = mails // rounds
    after: list[float] = []
    rates: list[float] = []
    pruned = 0
    try:
        await running.consuming()
        await asyncio.sleep(1)
        idle = running.rss()
        cpu = running.cpu_seconds()
        for number in range(rounds):
            target = stack.sink.accepted + per_round
            jobs = [bench_job(f"soak{number}-{uuid.uuid4().hex}", size) for _ in range(per_round)]
            await publish_backlog(settings, jobs)
            started = time.monotonic()
            await stack.sink.wait_for(target, 60 + per_round / 20)
            rates.append(per_round / (time.monotonic() - started))
            after.append(running.rss() / MB)
            pruned += await asyncio.to_thread(stack.prune_expired)
        cpu = running.cpu_seconds() - cpu
    finally:
        await running.stop()
        await drop_database(settings)
    return {
        "mails": per_round * rounds,
        "rounds": rounds,
        "idle_rss_mb": round(idle / MB, 1),
        "rss_mb_after_first_round": round(after[0], 1),
        "rss_mb_after_last_round": round(after[-1], 1),
        "rss_mb_by_round": [round(r, 1) for r in after],
        "mails_per_second_by_round": [round(r) for r in rates],
        "records_swept": pruned,
        "cpu_seconds_per_1000_mails": round(cpu / (per_round * rounds) * 1000, 2),
    }
