"""``mailbus status`` after a scripted scenario, and the RabbitMQ management API's view of
the topology mailbus declares.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import httpx
from aio_pika.abc import AbstractChannel
from pydantic import SecretStr

from consumer.amqp.publish import publish_job
from consumer.core import ladder
from consumer.core.names import DUE_KEY, Names, consumed_queue_arguments, ladder_queue_arguments
from consumer.core.ratelimit import Limit
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from consumer.store.providers import ProviderStore
from deploy.devstack.processes import mailbus
from deploy.devstack.rabbitmq import PrivateRabbit
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import depth, job, publish_raw, until
from tests.conftest import RunningWorker
from tests.test_rate_limits import add_capped_outbox


async def status_of(settings: Settings) -> dict[str, Any]:
    """``mailbus status --json``, run as a user would."""
    done = await mailbus(settings, "status", "--json")
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def queue(status: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(q for q in status["queues"] if q["name"] == name)
    return found


async def test_status_reports_a_scripted_scenario(
    settings: Settings, channel: AbstractChannel, smtp: CaptureServer
) -> None:
    names = Names(settings.prefix)
    async with JobStore.connect(settings) as jobs:
        await ProviderStore(jobs.database).put("capped", [Limit(1, 3600)], 4)
    await add_capped_outbox(settings, smtp.url, "capped")
    smtp.faults.refuse_rcpt("nobody@example.org", "550 5.1.1 <nobody@example.org>: unknown")

    running = RunningWorker(settings)
    for i in range(2):
        await publish_job(channel, job(id=f"ok-{i}"), names=names)
    await publish_job(channel, job(id="refused", to=["nobody@example.org"]), names=names)
    await publish_raw(channel, names, b"{not json", message_id="garbage")
    await publish_job(channel, job(id="later"), names=names, delay_ms=3_600_000)

    async def settled() -> bool:
        return await depth(channel, names.dead) == 2 and len(smtp.received()) == 2

    await until(settled, 20)
    await running.shutdown()
    for i in range(3):
        await publish_job(channel, job(id=f"waiting-{i}"), names=names)

    status = await status_of(settings)
    assert status["queue_source"] == "amqp"
    assert queue(status, names.send_queue) == {
        "name": names.send_queue,
        "ready": 3,
        "unacked": None,
        "consumers": 0,
    }
    assert queue(status, names.send_now_queue)["ready"] == 0
    assert queue(status, names.dead)["ready"] == 2
    # 3,600 s from now: first parked at the level of its highest bit, 2^11 s.
    assert status["ladder"] == {"waiting": 1, "levels": {"11": 1}}
    today = status["today"]
    assert (today["sent"], today["failed"], today["dead"]) == (2, 1, 0)
    counts = {"sent": 2, "failed": 1, "dead": 0}
    assert today["by_domain"] == {"example.com": counts}
    assert today["by_outbox"] == {"capped-1": counts}
    assert today["by_provider"] == {"capped": counts}
    # Three sends were attempted through the provider, each taking a token of four.
    assert status["providers"] == {
        "capped": {
            "tokens": 1,
            "burst": 4,
            "slowdown": 1,
            "limits": [{"limit": "1/hour", "tokens": 1}],
        }
    }
    errors = status["last_errors"]
    assert [e["id"] for e in errors] == ["refused"]
    assert errors[0]["status"] == "failed"
    assert errors[0]["reason"] == "permanent"
    assert "550" in errors[0]["error"]

    text = await mailbus(settings, "status")
    assert text.returncode == 0, text.stderr
    assert "2 sent, 1 failed, 0 dead" in text.stdout
    assert "Delay ladder: 1 waiting (level 11: 1)" in text.stdout
    assert "1 of 4" in text.stdout
    assert "refused" in text.stdout


def api(rabbit: PrivateRabbit, path: str) -> Any:
    """GET one management API path for the node's default vhost."""
    url = f"{rabbit.management_url}api/{path}/{quote('/', safe='')}"
    response = httpx.get(url, auth=(rabbit.user, rabbit.password), timeout=10)
    response.raise_for_status()
    return response.json()


async def test_the_management_api_shows_the_topology_and_status_agrees(
    rabbit: PrivateRabbit, settings: Settings, channel: AbstractChannel
) -> None:
    names = Names(settings.prefix)
    queues = {q["name"]: q for q in api(rabbit, "queues")}
    for name in names.queues():
        assert queues[name]["type"] == "quorum"
        assert queues[name]["durable"] is True
    expected = consumed_queue_arguments(names, settings.delivery_limit)
    for name in (names.send_queue, names.send_now_queue, names.due_queue, names.control_queue):
        assert queues[name]["arguments"] == expected
    for level in range(ladder.LEVELS):
        assert queues[names.delay(level)]["arguments"] == ladder_queue_arguments(names, level)
    exchanges = {e["name"]: e["type"] for e in api(rabbit, "exchanges")}
    assert exchanges[names.exchange] == "topic"
    assert exchanges[names.dead] == "fanout"
    assert exchanges[names.events] == "topic"
    assert exchanges[names.deliver] == "topic"
    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in api(rabbit, "bindings")}
    assert (names.exchange, names.send_queue, "send") in bindings
    assert (names.exchange, names.send_now_queue, "send.now") in bindings
    # The ladder's foot routes to the due queue; the jobs exchange does not (the default
    # exchange, as for every queue, is a matter of broker permissions).
    assert [b for b in bindings if b[1] == names.due_queue and b[0]] == [
        (names.deliver, names.due_queue, ladder.deliver_pattern(DUE_KEY))
    ]
    assert (names.exchange, names.control_queue, "control") in bindings
    assert (names.dead, names.dead, "") in bindings

    running = RunningWorker(settings)
    await publish_raw(channel, names, b"[]", message_id="garbage")
    await publish_job(channel, job(id="later"), names=names, delay_ms=60_000)
    managed = settings.model_copy(update={"management_url": SecretStr(rabbit.management_url)})

    async def caught_up() -> bool:
        status = await status_of(managed)
        return (
            queue(status, names.dead)["ready"] == 1
            and status["ladder"]["waiting"] == 1
            and queue(status, names.send_queue)["consumers"] == 1
        )

    await until(caught_up, 30)
    by_api, by_amqp = await status_of(managed), await status_of(settings)
    await running.shutdown()
    assert by_api["queue_source"] == "management"
    consumed = (names.send_queue, names.send_now_queue, names.due_queue, names.control_queue)
    for name in (*consumed, names.dead):
        figures = queue(by_api, name)
        assert figures["unacked"] == 0
        assert (figures["ready"], figures["consumers"]) == (
            queue(by_amqp, name)["ready"],
            queue(by_amqp, name)["consumers"],
        )
    assert by_api["ladder"] == by_amqp["ladder"] == {"waiting": 1, "levels": {"5": 1}}


async def test_status_says_why_the_management_api_refused(
    rabbit: PrivateRabbit, settings: Settings, channel: AbstractChannel
) -> None:
    url = rabbit.management_url.replace("http://", "http://mailbus:wrong-secret@")
    done = await mailbus(settings.model_copy(update={"management_url": SecretStr(url)}), "status")
    assert done.returncode == 1
    assert "answered 401" in done.stderr
    assert "wrong-secret" not in done.stderr + done.stdout
