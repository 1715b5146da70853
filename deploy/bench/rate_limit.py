"""Rate-limit accuracy: several worker processes drain a backlog through one provider's
limit; the SMTP sink's receive times show whether any window held more than the limit
allows and how much of the allowed rate was used.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika

from consumer.amqp import topology
from consumer.amqp.publish import job_message, jobs_exchange
from consumer.clock import utcnow
from consumer.core.names import SEND_KEY, Names
from consumer.core.outboxes import outbox_from_url
from consumer.core.ratelimit import MICROS, Limit
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from consumer.store.outboxes import OutboxStore, outbox_document
from consumer.store.providers import ProviderStore
from deploy.bench.percentiles import summary
from deploy.devstack.processes import spawn_worker
from deploy.devstack.smtp_capture import CaptureServer

DOMAIN = "ratelimit.example"


def sent_slots(logs: Iterable[Path]) -> dict[str, int]:
    """The token moment (microseconds, MongoDB's clock) each job sent in these worker logs
    (JSON, at INFO) went out on, by job id: its ``job.sent`` line's ``rate_slot``.
    """
    slots = {}
    for log in logs:
        for line in log.read_text().splitlines():
            if '"job.sent"' in line:
                sent = json.loads(line)
                slot = datetime.fromisoformat(sent["rate_slot"])
                slots[sent["job_id"]] = round(slot.timestamp() * MICROS)
    return slots


def most_in_a_window(times_us: Sequence[int], length_us: int) -> int:
    """The largest number of ``times_us`` in any half-open window of ``length_us``."""
    ordered = sorted(times_us)
    best, start = 0, 0
    for end, moment in enumerate(ordered):
        while ordered[start] <= moment - length_us:
            start += 1
        best = max(best, end - start + 1)
    return best


async def _configure(settings: Settings, smtp: CaptureServer, limit: Limit, burst: int) -> None:
    async with JobStore.connect(settings) as jobs:
        await ProviderStore(jobs.database).put("bench", [limit], burst)
        outbox = outbox_from_url(smtp.url, name="bench-1")
        doc = outbox_document(outbox, DOMAIN, "bench", None, utcnow())
        await OutboxStore(jobs.database).put(doc, replace=True)


async def consumers(channel: aio_pika.abc.AbstractChannel, queue: str) -> int:
    """The number of consumers on ``queue``."""
    declared = await channel.declare_queue(queue, passive=True)
    return declared.declaration_result.consumer_count or 0


async def measure(
    settings: Settings,
    smtp: CaptureServer,
    base: Path,
    workers: int,
    per_second: int,
    seconds: float,
    burst: int,
) -> dict[str, Any]:
    """Publish a backlog of ``per_second * seconds`` jobs for a provider limited to
    ``per_second`` with ``burst``, drained by ``workers`` worker processes.
    """
    limit = Limit(per_second, 1)
    count = round(per_second * seconds)
    names = Names(settings.prefix)
    await _configure(settings, smtp, limit, burst)
    smtp.reset()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        async with await aio_pika.connect(settings.amqp_url.get_secret_value()) as connection:
            channel = await connection.channel(publisher_confirms=True)
            await topology.declare(channel, names, settings.delivery_limit)
            # At INFO, each sent job's log line says which token it went out on.
            logged = settings.model_copy(update={"log_level": "INFO"})
            logs = [base / f"ratelimit-worker{i}.log" for i in range(workers)]
            processes = [spawn_worker(logged, log) for log in logs]
            async with asyncio.timeout(120):
                while await consumers(channel, names.send_queue) < workers:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
            exchange = await jobs_exchange(channel, names)
            started = time.time()
            for _ in range(count):
                job_id = f"rate-{uuid.uuid4().hex}"
                body = {
                    "id": job_id,
                    "domain": DOMAIN,
                    "from": "bench@ratelimit.example",
                    "to": ["sink@example.org"],
                    "subject": job_id,
                    "text": "rate limit",
                }
                await exchange.publish(job_message(body), routing_key=SEND_KEY)
            published_in = time.time() - started
        async with asyncio.timeout(seconds * 3 + 120):
            received = await smtp.wait_for(count)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            await asyncio.to_thread(process.wait, 60)
    times = sorted(m.received_at for m in received)
    span = times[-1] - times[0]
    allowed = per_second + burst - 1
    most = most_in_a_window([round(t * 1_000_000) for t in times], 1_000_000)
    fastest = (count - burst) / per_second  # the burst at once, then the steady pace
    arrived = {str(m.message()["Subject"]): round(m.received_at * MICROS) for m in received}
    slots = {job: at for job, at in sent_slots(logs).items() if job in arrived}
    return {
        "workers": workers,
        "limit": str(limit),
        "burst": burst,
        "jobs": count,
        "delivered": len(received),
        "publish_seconds": round(published_in, 2),
        "max_in_any_1s_window": most,
        "allowed_in_any_1s_window": allowed,
        "exceeded": most > allowed,
        # Where the cap is enforced: the tokens the sends took, on MongoDB's clock (the same
        # machine's here), and how long after its token each mail reached the sink.
        "max_tokens_in_any_1s_window": most_in_a_window(list(slots.values()), MICROS),
        "arrival_after_token_ms": summary(
            [(arrived[job] - at) / 1000 for job, at in slots.items()]
        ),
        "seconds_first_to_last": round(span, 2),
        "achieved_per_second": round((count - 1) / span, 2) if span else None,
        "utilization": round(fastest / span, 4) if span else None,
        "sends_each_second": [
            sum(1 for t in times if second <= t - times[0] < second + 1)
            for second in range(int(span) + 1)
        ],
    }
