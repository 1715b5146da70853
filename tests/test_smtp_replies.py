"""SMTP replies under a provider's reply rules, and a provider slowed by throttling replies:
a real worker, RabbitMQ, MongoDB (SecantusDB) and the fault-injecting SMTP server.
"""

from __future__ import annotations

import itertools
from typing import Any

from aio_pika.abc import AbstractChannel

from consumer.amqp.publish import publish_job
from consumer.clock import utcnow
from consumer.core.names import Names
from consumer.core.ratelimit import Limit
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from consumer.store.providers import ProviderStore, slowdown_of
from deploy.devstack.processes import mailbus
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import depth, job, until
from tests.conftest import RunningWorker
from tests.test_rate_limits import add_capped_outbox


async def final_record(store: JobStore, job_id: str) -> dict[str, Any]:
    """The job's record once it is sent, failed or dead (retries wait ``scheduled``)."""
    found: dict[str, Any] = {}

    async def finished() -> bool:
        found.update(await store.get(job_id) or {})
        return found.get("status") in ("sent", "failed", "dead")

    await until(finished, 20)
    return found


async def test_a_refusal_a_providers_rule_calls_transient_is_retried_then_sent(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    worker: RunningWorker,
) -> None:
    names = Names(settings.prefix)
    made = await mailbus(
        settings, "provider", "set", "p", "--limit", "100/s", "--burst", "10",
        "--reply", "transient: 550 5.7.1 rate limited",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "  transient: 550 5.7.1 rate limited" in made.stdout
    await add_capped_outbox(settings, smtp.url, "p")

    smtp.faults.refuse_data("550 5.7.1 Rate limited, try again later")
    await publish_job(channel, job(id="with-rule"), names=names)
    record = await final_record(store, "with-rule")
    assert (record["status"], record["attempts"]) == ("sent", 2)
    assert [entry["smtp"]["code"] for entry in record["history"] if "smtp" in entry][:1] == [550]
    assert len(smtp.received()) == 1

    cleared = await mailbus(settings, "provider", "replies", "p")
    assert cleared.returncode == 0, cleared.stderr
    smtp.faults.refuse_data("550 5.7.1 Rate limited, try again later")
    await publish_job(channel, job(id="without-rule"), names=names)
    record = await final_record(store, "without-rule")
    assert (record["status"], record["attempts"]) == ("failed", 1)
    assert record["last_error"] == "550 5.7.1 Rate limited, try again later"
    await until(lambda: _one_dead(channel, names))
    assert len(smtp.received()) == 1


async def _one_dead(channel: AbstractChannel, names: Names) -> bool:
    return await depth(channel, names.dead) == 1


async def test_throttling_replies_slow_the_providers_bucket(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    worker: RunningWorker,
) -> None:
    names = Names(settings.prefix)
    providers = ProviderStore(store.database)
    await providers.put("t", [Limit(10, 1)], 1)
    await add_capped_outbox(settings, smtp.url, "t")
    smtp.faults.refuse_data("421 4.7.0 Try again later, closing connection")
    await publish_job(channel, job(id="throttled"), names=names)
    record = await final_record(store, "throttled")
    assert (record["status"], record["attempts"]) == ("sent", 2)

    doc = await providers.get("t")
    assert doc is not None
    assert slowdown_of(doc, utcnow()) == 2  # for MAILBUS_THROTTLE_SECONDS (300 s)
    # The next sends are let through half as often: 10/s becomes one every 200 ms, on
    # MongoDB's clock.
    grants = await providers.take("t", "enqueue", 3)
    assert grants is not None
    assert [b.slot_us - a.slot_us for a, b in itertools.pairwise(grants)] == [200_000] * 2
    registry = worker.worker.metrics.registry
    labels = {"outbox": "capped-1", "provider": "t"}
    assert registry.get_sample_value("mailbus_smtp_throttled_total", labels) == 1

    # Setting the provider anew ends the slowdown, as it refills the buckets.
    await providers.put("t", [Limit(10, 1)], 1)
    grants = await providers.take("t", "enqueue", 3)
    assert grants is not None
    assert [b.slot_us - a.slot_us for a, b in itertools.pairwise(grants)] == [100_000] * 2
