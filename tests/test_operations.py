"""The worker's HTTP endpoints: Prometheus metrics that count exactly, health and readiness."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aio_pika.abc import AbstractChannel
from prometheus_client.parser import text_string_to_metric_families

from consumer.amqp.publish import publish_job
from consumer.core.names import Names
from consumer.core.ratelimit import parse_limit
from consumer.service.health import NOT_CHECKED, Readiness
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from consumer.store.providers import ProviderStore
from deploy.devstack.processes import spawn_worker
from deploy.devstack.rabbitmq import PrivateRabbit
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import job, publish_raw, until
from tests.conftest import RunningWorker


@pytest.fixture
async def served(settings: Settings, channel: AbstractChannel) -> AsyncIterator[RunningWorker]:
    """A worker serving its HTTP endpoints on a free loopback port."""
    running = RunningWorker(settings.model_copy(update={"http_port": 0}))
    async with asyncio.timeout(20):
        while running.worker.http_port is None:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    yield running
    await running.shutdown()


async def get(worker: RunningWorker, path: str) -> httpx.Response:
    """One request to the worker's endpoints."""
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(f"http://127.0.0.1:{worker.worker.http_port}{path}")


async def samples(worker: RunningWorker) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample ``/metrics`` shows, by name and sorted labels."""
    text = (await get(worker, "/metrics")).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_count_what_happened(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer, served: RunningWorker
) -> None:
    names = Names(settings.prefix)
    smtp.faults.refuse_rcpt("nobody@example.org", "550 5.1.1 <nobody@example.org>: unknown")
    for i in range(5):
        await publish_job(channel, job(subject=f"m{i}"), names=names)
    await publish_job(channel, job(to=["nobody@example.org"]), names=names)
    await publish_raw(channel, names, b"not json", message_id="garbage")
    sent_key = ("mailbus_jobs_sent_total", (("outbox", "default"), ("provider", "")))
    async with asyncio.timeout(20):
        while True:
            found = await samples(served)
            dead = sum(v for (n, _), v in found.items() if n == "mailbus_jobs_dead_total")
            if found.get(sent_key) == 5 and dead == 2:
                break
            await asyncio.sleep(0.1)
    assert found[("mailbus_jobs_received_total", ())] == 7
    assert found[("mailbus_jobs_dead_total", (("reason", "invalid"),))] == 1
    assert found[("mailbus_jobs_dead_total", (("reason", "permanent"),))] == 1
    failed = (("outbox", "default"), ("provider", ""), ("reason", "permanent"))
    assert found[("mailbus_jobs_failed_total", failed)] == 1
    assert found[("mailbus_send_seconds_count", (("outbox", "default"),))] == 5
    assert found[("mailbus_delivery_seconds_count", ())] == 5
    assert found[("mailbus_scheduled_lateness_seconds_count", ())] == 0
    assert found[("mailbus_in_flight", ())] == 0
    assert found[("mailbus_smtp_connections", (("outbox", "default"),))] >= 1
    mongo = {dict(labels)["command"]: v for (n, labels), v in found.items() if "mongo" in n}
    assert mongo["createIndexes"] >= 1
    # Claims and outcomes are written, if in batches.
    assert mongo.get("update", 0) + mongo.get("insert", 0) >= 2
    assert len(smtp.received()) == 5


async def test_health_and_readiness_follow_the_broker(
    rabbit: PrivateRabbit, served: RunningWorker
) -> None:
    assert (await get(served, "/healthz")).status_code == 200
    await until(lambda: ready(served), 20)
    assert (await get(served, "/nope")).status_code == 404

    await asyncio.to_thread(rabbit.stop)
    try:
        # A readiness answer serves probes for a second: the next one sees the broker gone.
        await until(lambda: not_ready(served), 5)
        down = await get(served, "/readyz")
        assert down.status_code == 503
        assert "not consuming from RabbitMQ" in down.text
        assert (await get(served, "/healthz")).status_code == 200  # alive all the same
    finally:
        await asyncio.to_thread(rabbit.start)
    await until(lambda: ready(served), 60)


async def test_silent_and_dripping_clients_do_not_hold_up_the_probes(
    settings: Settings, channel: AbstractChannel
) -> None:
    running = RunningWorker(settings.model_copy(update={"http_port": 0, "http_read_timeout": 1}))
    try:
        async with asyncio.timeout(20):
            while running.worker.http_port is None:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        port = running.worker.http_port
        loop = asyncio.get_running_loop()
        # As many silent connections as the server holds (16), and one dripping its
        # request a byte at a time, faster than any per-read timeout.
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(16)]
        dripper = asyncio.create_task(drip(port, b"GET /healthz HTTP/1.1\r\n" + b"X" * 100))
        started = loop.time()
        for path in ("/healthz", "/metrics", "/healthz"):
            assert (await get(running, path)).status_code == 200
        assert loop.time() - started < 1.0  # answered at once, not after the timeout
        async with asyncio.timeout(5):
            for reader, _ in silent:
                assert await reader.read() == b""  # closed by the server
            assert await dripper == b""
        assert loop.time() - started < 3.0
        for _, writer in silent:
            writer.close()
        assert (await get(running, "/healthz")).status_code == 200
    finally:
        await running.shutdown()


async def drip(port: int, data: bytes) -> bytes:
    """Send ``data`` a byte every 50 ms; what the server answered before it closed the
    connection.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)
        return await reader.read()
    except ConnectionError:  # closed while we were still sending
        return b""
    finally:
        writer.close()


async def ready(worker: RunningWorker) -> bool:
    """Whether ``/readyz`` says so."""
    return (await get(worker, "/readyz")).status_code == 200


async def not_ready(worker: RunningWorker) -> bool:
    """Whether ``/readyz`` says the worker is not ready."""
    return (await get(worker, "/readyz")).status_code == 503


async def test_a_storm_of_readiness_probes_runs_one_check_at_a_time() -> None:
    """Probes arriving together share one check: none waits on MongoDB in its own right,
    so none holds a connection of the server's while it does.
    """
    loop = asyncio.get_running_loop()
    pings = 0

    async def slow_ping() -> None:
        nonlocal pings
        pings += 1
        await asyncio.sleep(0.5)

    readiness = Readiness(loop, lambda: True, slow_ping)
    first = asyncio.create_task(asyncio.to_thread(readiness.problems))
    await asyncio.sleep(0.1)  # the first check is under way
    started = loop.time()
    during = await asyncio.gather(*(asyncio.to_thread(readiness.problems) for _ in range(16)))
    assert loop.time() - started < 0.3  # answered at once, not after the ping
    assert during == [[NOT_CHECKED]] * 16
    assert await first == []
    after = await asyncio.gather(*(asyncio.to_thread(readiness.problems) for _ in range(16)))
    assert after == [[]] * 16
    assert pings == 1


async def test_one_json_log_line_per_outcome(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer, tmp_path: Path
) -> None:
    names = Names(settings.prefix)
    smtp.faults.refuse_rcpt("nobody@example.org", "550 5.1.1 unknown")
    log = tmp_path / "worker.log"
    process = spawn_worker(settings.model_copy(update={"log_format": "json"}), log)
    try:
        body = "a body that stays out of the logs"
        await publish_job(channel, job(id="fine", text=body), names=names)
        await publish_job(channel, job(id="refused", to=["nobody@example.org"]), names=names)
        async with asyncio.timeout(30):
            await smtp.wait_for(1)
        await until(lambda: _logged(log, "job.dead"), 30)
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 30)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    [sent] = [line for line in lines if line["event"] == "job.sent"]
    [dead] = [line for line in lines if line["event"] == "job.dead"]
    common = {"domain": "example.com", "outbox": "default", "attempt": 1, "level": "info"}
    assert sent.items() >= {**common, "job_id": "fine", "result": "sent", "smtp_code": 250}.items()
    assert dead.items() >= {"job_id": "refused", "result": "dead", "reason": "permanent"}.items()
    assert dead["smtp_code"] == 550
    for line in (sent, dead):
        assert 0 < line["duration_ms"] < 30_000
        assert line["timestamp"].endswith("Z")
    assert body not in log.read_text()


async def _logged(log: Path, event: str) -> bool:
    text = await asyncio.to_thread(log.read_text)
    return f'"event": "{event}"' in text


async def test_metrics_show_tokens_left_per_provider_limit(
    settings: Settings, store: JobStore, served: RunningWorker
) -> None:
    providers = ProviderStore(store.database)
    await providers.put("gauged", [parse_limit("5/minute"), parse_limit("100/day")], 3)
    labels = (("limit", "5/minute"), ("provider", "gauged"))
    assert (await samples(served))[("mailbus_provider_tokens", labels)] == 3
    await providers.take("gauged", "try")
    found = await samples(served)
    assert found[("mailbus_provider_tokens", labels)] == 2
    assert found[("mailbus_provider_tokens", (("limit", "100/day"), ("provider", "gauged")))] == 2
