"""Provider limits shared by every worker: token buckets in MongoDB, throttled jobs deferred."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import subprocess
from collections.abc import Iterable
from pathlib import Path

from aio_pika.abc import AbstractChannel

from consumer.amqp.publish import publish_job
from consumer.clock import utcnow
from consumer.core.names import Names
from consumer.core.outboxes import outbox_from_url
from consumer.core.ratelimit import MICROS, Bucket, Limit, Mode, parse_limit, take
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from consumer.store.outboxes import OutboxStore, outbox_document
from consumer.store.providers import ProviderStore
from deploy.bench.rate_limit import consumers, most_in_a_window, sent_slots
from deploy.devstack.processes import mailbus, spawn_worker
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import depth, drain_events, job, listen_events, until
from tests.conftest import RunningWorker


def token_times(logs: Iterable[Path]) -> list[int]:
    """The moments (microseconds, MongoDB's clock) of the tokens the sent jobs in these
    worker logs went out on.
    """
    return list(sent_slots(logs).values())


async def add_capped_outbox(settings: Settings, url: str, provider: str) -> None:
    """An outbox of example.com, sending to ``url``, under ``provider``'s limits."""
    async with JobStore.connect(settings) as jobs:
        outbox = outbox_from_url(url, name="capped-1", timeout=5.0)
        doc = outbox_document(outbox, "example.com", provider, None, utcnow())
        assert await OutboxStore(jobs.database).put(doc, replace=False)


async def test_provider_commands(settings: Settings) -> None:
    made = await mailbus(
        settings, "provider", "set", "gmail", "--limit", "500/day", "--limit", "20/minute",
        "--burst", "5",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "created: 500/day, 20/minute, burst 5" in made.stdout
    listed = await mailbus(settings, "provider", "ls")
    assert re.split(r"\s{2,}", listed.stdout.splitlines()[1].strip()) == [
        "gmail",
        "5",
        "500/day, 20/minute",
        "0",  # reply rules
    ]
    shown = json.loads((await mailbus(settings, "provider", "show", "gmail")).stdout)
    assert [(x["count"], x["period"], x["interval"]) for x in shown["limits"]] == [
        (500, 86400, 172_800_000),
        (20, 60, 3_000_000),
    ]
    again = await mailbus(settings, "provider", "set", "gmail", "--limit", "10/s")
    assert "replaced: 10/second, burst 1" in again.stdout

    bad = await mailbus(settings, "provider", "set", "gmail", "--limit", "10/fortnight")
    assert bad.returncode == 2
    assert "a limit looks like 20/minute" in bad.stderr
    assert (await mailbus(settings, "provider", "rm", "gmail")).returncode == 0
    gone = await mailbus(settings, "provider", "rm", "gmail")
    assert gone.returncode == 1
    assert "no provider 'gmail'" in gone.stderr


async def test_the_server_computes_what_the_pure_arithmetic_does(store: JobStore) -> None:
    """The update pipeline MongoDB runs is ratelimit.take: same answers, same buckets,
    for single tokens and for blocks.
    """
    providers = ProviderStore(store.database)
    limits = [Limit(5, 1), Limit(12, 60)]
    await providers.put("p", limits, 2)
    buckets = [Bucket(), Bucket()]
    modes: list[Mode] = ["try"] * 3 + ["enqueue"] * 4 + ["queued", "try", "enqueue"] * 2
    takes = [(mode, 1, 0) for mode in modes] + [
        ("queued", 3, 3 * MICROS),
        ("enqueue", 4, MICROS),
        ("try", 2, 0),
        ("queued", 6, 60 * MICROS),
        ("enqueue", 5, 2 * MICROS),
    ]
    ahead = 0
    for mode, count, horizon in takes:
        grants = await providers.take("p", mode, count, horizon)
        assert grants is not None
        expected, buckets = take(limits, 2, buckets, grants[0].now_us, mode, count, horizon)
        assert grants == expected
        doc = await providers.get("p")
        assert doc is not None
        assert [Bucket(x["tat"], x["queue"]) for x in doc["limits"]] == buckets
        ahead += sum(1 for g in grants if g.granted and g.slot_us > g.now_us)
    assert ahead > 0  # some blocks held tokens due later than their take
    assert await providers.take("undefined", "try") is None


async def test_the_server_slows_a_bucket_as_the_pure_arithmetic_does(store: JobStore) -> None:
    """A slowdown that starts just after a burst lets nothing more through at once."""
    providers = ProviderStore(store.database)
    limits = [Limit(2, 1)]  # a token every 500 ms: the takes below fall well within one
    await providers.put("b", limits, 5)
    burst = await providers.take("b", "try", 5)
    assert burst is not None
    assert all(g.granted for g in burst)
    doc = await providers.get("b")
    assert doc is not None
    buckets = [Bucket(x["tat"], x["queue"]) for x in doc["limits"]]
    assert await providers.slow("b", 60) is not None
    slowed = await providers.take("b", "try", 2)
    assert slowed is not None
    assert not any(g.granted for g in slowed)
    expected, _ = take(limits, 5, buckets, slowed[0].now_us, "try", 2, slowdown=2)
    assert slowed == expected


async def test_a_throttled_job_waits_without_using_an_attempt(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer, worker: RunningWorker
) -> None:
    names = Names(settings.prefix)
    async with JobStore.connect(settings) as jobs:
        await ProviderStore(jobs.database).put("slow", [parse_limit("1/2s")], 1)
    await add_capped_outbox(settings, smtp.url, "slow")
    events = await listen_events(channel, names)
    for i in range(3):
        await publish_job(channel, job(id=f"capped-{i}", subject=f"capped {i}"), names=names)
    async with asyncio.timeout(20):
        await smtp.wait_for(3)
    times = sorted(m.received_at for m in smtp.received())
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert min(gaps) > 1.95, gaps  # one token every two seconds, by the server's clock
    assert max(gaps) < 2.8, gaps  # and each waiting job went as soon as its token came

    deferred = [body for key, body in await drain_events(channel, events) if key == "mail.deferred"]
    # Whichever took the token first went at once, the next one's token was due within
    # CLOSE_WAIT (2 s) so it waited in place; the third waited its turn in the queue.
    assert len(deferred) == 1
    assert {body["reason"] for body in deferred} == {"rate_limited"}
    async with JobStore.connect(settings) as jobs:
        records = [await jobs.get(f"capped-{i}") for i in range(3)]
    assert [(r["status"], r["attempts"], r["outbox"]) for r in records if r] == [
        ("sent", 1, "capped-1")
    ] * 3
    assert await depth(channel, names.dead) == 0


async def test_four_workers_share_one_limit(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer, tmp_path: Path
) -> None:
    """4 worker processes, 5/second with burst 2, 60 jobs at once: never more than 5 + 2 - 1
    tokens in any second of MongoDB's clock, all delivered, none dead, close to the cap's
    pace by the SMTP server's clock. (Receive times alone can bunch when a loaded machine
    delays a send after its token: deploy/README.md, "Providers and rate limits".)
    """
    burst, count = 2, 60
    names = Names(settings.prefix)
    made = await mailbus(settings, "provider", "set", "capped", "--limit", "5/s", "--burst", "2")
    assert made.returncode == 0, made.stderr
    await add_capped_outbox(settings, smtp.url, "capped")
    workers: list[subprocess.Popen[bytes]] = []

    async def consumers_are(wanted: int) -> bool:
        return await consumers(channel, names.send_queue) == wanted

    try:
        for i in range(4):
            workers.append(spawn_worker(settings, tmp_path / f"worker{i}.log"))
        await until(lambda: consumers_are(4), seconds=60)
        started = asyncio.get_running_loop().time()
        for i in range(count):
            await publish_job(channel, job(id=f"burst-{i}", subject=f"n{i}"), names=names)
        async with asyncio.timeout(60):
            await smtp.wait_for(count)
        elapsed = asyncio.get_running_loop().time() - started
    finally:
        for process in workers:
            process.send_signal(signal.SIGTERM)
        for process in workers:
            await asyncio.to_thread(process.wait, 30)
    received = smtp.received()
    assert sorted(m.message()["Subject"] for m in received) == sorted(f"n{i}" for i in range(count))
    tokens = token_times(tmp_path / f"worker{i}.log" for i in range(4))
    assert len(tokens) == count
    assert most_in_a_window(tokens, MICROS) == 5 + burst - 1
    fastest = (count - burst) / 5  # the burst at once, then one token every 0.2 s
    assert fastest - 0.1 < elapsed < fastest * 1.25 + 1, elapsed
    assert await depth(channel, names.dead) == 0
