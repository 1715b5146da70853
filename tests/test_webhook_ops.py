"""Operating the webhook service: its metrics and probes, the webhooks queues in `mailbus
status`, and the deliveries it gave up on, listed and replayed on the real broker (never
as jobs, nor jobs as webhook deliveries).
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import aio_pika
import httpx
import pytest
import structlog
from aio_pika.abc import AbstractChannel
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from consumer.cli.app import _parser
from consumer.cli.webhooks import _age
from consumer.clock import utcnow
from consumer.core.headers import EVENT_SEAL_HEADER, REASON_HEADER, WEBHOOK_HEADER
from consumer.core.names import Names
from consumer.core.webhooks import event_seal_input
from consumer.service.status import gather
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from consumer.store.webhooks import WebhookStore
from consumer.vault import Vault, new_key
from tests.broker import depth, encode, job, until
from tests.conftest import RunningWorker, cli
from tests.secret_watch import watched
from tests.test_webhooks import hooked
from tests.webhook_receiver import Receiver, receiving, webhook_service

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(port: int | None, path: str = "/metrics") -> httpx.Response:
    """One request to the webhook service's HTTP endpoints."""
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(f"http://127.0.0.1:{port}{path}")


def samples_of(text: str) -> Samples:
    """Every sample of a /metrics page, by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def deliveries(samples: Samples, outcome: str, reason: str = "") -> float:
    """``mailbus_webhook_deliveries_total`` for one outcome and reason (0 when absent)."""
    key = ("mailbus_webhook_deliveries_total", (("outcome", outcome), ("reason", reason)))
    return samples.get(key, 0.0)


async def add(
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
    receiver: Receiver,
    path: str,
    domain: str = "example.com",
) -> str:
    """Add a webhook for ``domain`` at ``path`` of the receiver; its id."""
    added = await cli(settings, capsys, "webhook", "add", domain, receiver.url(path))
    receiver.secrets[path] = watched(added.split("secret (shown once): ")[1].strip())
    return added.split()[1]


def sealed(settings: Settings, message_id: str, body: bytes) -> dict[str, str]:
    """The seal a worker puts on the event it publishes."""
    seal = Vault.from_settings(settings).sign(event_seal_input(message_id, body))
    return {EVENT_SEAL_HEADER: seal}


async def test_given_up_deliveries_are_counted_listed_and_replayed_for_their_webhook_alone(
    settings: Settings, channel: AbstractChannel, capsys: pytest.CaptureFixture[str]
) -> None:
    # Any failure is past the maximum age at once: given up on its first attempt.
    settings = hooked(settings, webhook_allow_private=True, webhook_max_age=0.5, http_port=0)
    names = Names(settings.prefix)
    event = {"event": "mail.sent", "id": "j-1", "domain": "example.com", "attempts": 1}
    async with receiving() as receiver:
        receiver.answer["/down"] = lambda seen: 503 if seen == 0 else 204
        receiver.answer["/gone"] = lambda _: 410
        ok, down, gone = [
            await add(settings, capsys, receiver, p) for p in ("/ok", "/down", "/gone")
        ]
        await add(settings, capsys, receiver, "/other", "other.example")
        async with webhook_service(settings) as service:
            assert (await scrape(service.http_port, "/healthz")).status_code == 200
            ready = await scrape(service.http_port, "/readyz")
            assert (ready.status_code, ready.text) == (200, "ready\n")
            events = await channel.get_exchange(names.events, ensure=False)
            body = json.dumps(event).encode()
            await events.publish(
                aio_pika.Message(body, message_id="e-1", headers=sealed(settings, "e-1", body)),
                routing_key="mail.sent",
            )
            await events.publish(aio_pika.Message(b"not json"), routing_key="mail.sent")

            async def given_up() -> bool:
                return await depth(channel, names.webhooks_dead) == 3

            await until(given_up, 20)
            counted = samples_of((await scrape(service.http_port)).text)
            status = await gather(settings, utcnow())

            # A job's dead letter among the webhooks', and a webhook delivery among the jobs'.
            await channel.default_exchange.publish(
                aio_pika.Message(encode(job(id="a-job")), headers={REASON_HEADER: "permanent"}),
                routing_key=names.webhooks_dead,
            )
            dead_exchange = await channel.get_exchange(names.dead, ensure=False)
            await dead_exchange.publish(
                aio_pika.Message(
                    json.dumps(event).encode(),
                    message_id="e-1",
                    headers={REASON_HEADER: "expired", WEBHOOK_HEADER: down},
                ),
                routing_key="",
            )
            # An event the broker gave up on before any endpoint (the service kept crashing).
            death = {"reason": "delivery_limit", "queue": names.webhooks_queue, "count": 1}
            other = json.dumps({**event, "id": "j-2", "domain": "other.example"}).encode()
            await channel.default_exchange.publish(
                aio_pika.Message(
                    other,
                    message_id="e-2",
                    headers={
                        "x-death": [{**death, "time": utcnow().replace(microsecond=0)}],
                        **sealed(settings, "e-2", other),
                    },
                ),
                routing_key=names.webhooks_dead,
            )
            listed = await cli(settings, capsys, "webhook", "dead")
            down_id = next(line.split()[0] for line in listed.splitlines() if down in line)
            replayed = await cli(settings, capsys, "webhook", "replay", "--id", down_id, "e-2")
            refused = await cli(settings, capsys, "webhook", "replay", "--all")
            capsys.readouterr()
            missing = _parser().parse_args(["webhook", "replay", "--id", "msg_nothing"])
            assert await missing.handler(missing, settings) == 1
            assert "no given-up delivery 'msg_nothing'" in capsys.readouterr().err

            async def redelivered() -> bool:
                return (
                    len(receiver.delivered("/down")) == 1 and len(receiver.delivered("/other")) == 1
                )

            await until(redelivered, 20)
            as_jobs = await cli(settings, capsys, "dead", "replay", "--all")
            left = await cli(settings, capsys, "webhook", "dead")
            after = samples_of((await scrape(service.http_port)).text)
            logged = await cli(settings, capsys, "webhook", "log")

    assert deliveries(counted, "delivered") == 1
    assert deliveries(counted, "given_up", "expired") == 1
    assert deliveries(counted, "given_up", "gone") == 1
    assert deliveries(counted, "given_up", "invalid") == 1
    assert deliveries(counted, "failed") == 0
    assert counted[("mailbus_webhook_attempt_seconds_count", ())] == 3
    assert deliveries(after, "delivered") == 3

    # Status shows the webhooks queues while they exist.
    rows = {q["name"]: q for q in status["queues"]}
    assert rows[names.webhooks_queue]["consumers"] == 1
    assert rows[names.webhooks_dead]["ready"] == 3

    # The listing: a row per dead letter (the job's too, to be seen), never a secret.
    lines = listed.splitlines()[1:]
    assert len(lines) == 5
    by_webhook = {line.split()[1]: line.split() for line in lines}
    assert by_webhook[down][2:5] == ["mail.sent", "j-1", "expired"]
    assert by_webhook[gone][2:5] == ["mail.sent", "j-1", "gone"]
    assert ok not in by_webhook
    assert [line.split()[4] for line in lines if line.split()[1] == "-"] == [
        "invalid",
        "permanent",
        "delivery_limit",
    ]
    assert "whsec_" not in listed + replayed + refused + left
    assert down_id.startswith("msg_")

    # The expired one went back for its webhook alone, with the webhook-id it had; the one
    # the broker gave up on, as the event, to every webhook of its domain that takes it.
    assert f"{down_id}: replayed (expired)" in replayed
    assert "e-2: replayed (delivery_limit)" in replayed
    assert "2 replayed" in replayed
    assert f"webhook {gone} is turned off" in refused
    assert "invalid, it would be given up again" in refused
    assert "not a webhook delivery" in refused
    assert "0 replayed" in refused
    assert [r.event["id"] for r in receiver.delivered("/ok")] == ["j-1"]
    assert [r.event["id"] for r in receiver.delivered("/other")] == ["j-2"]
    tried = [r for r in receiver.requests if r.path == "/down"]
    assert [r.status for r in tried] == [503, 204]
    assert tried[0].webhook_id == tried[1].webhook_id == down_id
    assert all(r.verified for r in receiver.requests)
    assert " delivered " in logged
    # `mailbus dead replay` never sends the webhook delivery as a job.
    assert "j-1: a webhook delivery, not replayed (left in the queue)" in as_jobs
    assert "0 replayed" in as_jobs
    assert len(left.splitlines()) == 4  # the header, gone, invalid and the job's


async def test_webhook_commands_without_a_webhook_service(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = hooked(settings)
    names = Names(settings.prefix)
    status = await gather(settings, utcnow())
    assert [(q["name"], q.get("missing")) for q in status["queues"]] == [
        (name, True)
        for name in (
            names.send_queue,
            names.send_now_queue,
            names.due_queue,
            names.control_queue,
            names.dead,
        )
    ]
    for argv in (["webhook", "dead"], ["webhook", "replay", "--all"]):
        args = _parser().parse_args(argv)
        capsys.readouterr()
        assert await args.handler(args, settings) == 1
        assert "`mailbus webhook serve` has not run here" in capsys.readouterr().err


def test_ages() -> None:
    now = utcnow()
    assert _age(None, now) == "-"
    assert _age(now - timedelta(seconds=42), now) == "42s"
    assert _age(now - timedelta(minutes=5, seconds=20), now) == "5m20s"
    assert _age(now - timedelta(hours=4, minutes=10), now) == "4h10m"
    assert _age(now - timedelta(days=2, hours=3), now) == "2d3h"


@pytest.mark.parametrize("with_key", [False, True])
async def test_a_worker_without_the_key_says_webhooks_get_none_of_its_events(
    settings: Settings, channel: AbstractChannel, store: JobStore, with_key: bool
) -> None:
    """Its events go unsealed, and webhooks deliver none: a worker says so at start when
    endpoints are registered; one with the key says nothing of it.
    """
    await WebhookStore(store.database).add(
        "example.com", "https://hooks.example/in", ["mail.sent"], "sealed-secret"
    )
    if with_key:
        settings = settings.model_copy(update={"secret_key": SecretStr(watched(new_key()))})
    with structlog.testing.capture_logs() as logs:
        running = RunningWorker(settings)
        try:
            await until(lambda: _said(logs, "worker.consuming"), 20)
        finally:
            await running.shutdown()
    warned = [entry for entry in logs if entry["event"] == "worker.events_unsealed"]
    if with_key:
        assert warned == []
    else:
        [warning] = warned
        assert (warning["log_level"], warning["endpoints"]) == ("warning", 1)


async def _said(logs: list[dict[str, Any]], event: str) -> bool:
    return any(entry["event"] == event for entry in logs)
