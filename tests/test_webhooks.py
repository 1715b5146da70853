"""Signed HTTP webhooks: a domain's events reach the URLs that take them, signed as the
Standard Webhooks specification says, retried with the same webhook-id, in order for one
job, logged; an endpoint at a private address is refused and given up.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from aio_pika.abc import AbstractChannel
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from consumer.amqp.publish import publish_job
from consumer.core.headers import (
    ATTEMPTS_HEADER,
    ERROR_HEADER,
    EVENT_SEAL_HEADER,
    REASON_HEADER,
    WEBHOOK_HEADER,
)
from consumer.core.names import Names
from consumer.core.refusals import AttachmentError
from consumer.core.webhooks import (
    Attempt,
    check_events,
    event_seal_input,
    known_events,
    new_secret,
    next_step,
    secret_bytes,
    signature,
    signed_headers,
    webhook_id,
)
from consumer.mail.fetch import IPAddress
from consumer.mail.webhooks import WebhookPoster
from consumer.service.webhooks import WebhookService
from consumer.settings import Settings
from consumer.store.mongo import Mongo
from consumer.vault import Vault, new_key
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import job, take, until
from tests.conftest import RunningWorker, cli
from tests.secret_watch import watched
from tests.webhook_receiver import publish_event, receiving, verified, webhook_service

# The specification's published test vector.
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signatures_match_the_specifications_vector_and_an_independent_receiver() -> None:
    key = secret_bytes(VECTOR_SECRET)
    body = b'{"test": 2432232314}'
    assert signature(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == VECTOR_SIGNATURE
    secret = new_secret()
    assert secret.startswith("whsec_")
    assert len(secret_bytes(secret)) == 32
    now = int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(now),
        "webhook-signature": signature(secret_bytes(secret), "msg_1", now, b"{}"),
    }
    assert verified(secret, headers, b"{}")
    assert not verified(secret, headers, b'{"x":1}')
    assert not verified(new_secret(), headers, b"{}")
    for bad in ("secret", "whsec_not base64!", "whsec_c2hvcnQ=", "whsec_" + "A" * 300):
        with pytest.raises(ValueError, match="webhook secret"):
            secret_bytes(bad)


def test_the_operator_guides_receiver_verifies_what_mailbus_signs(repo_root: Path) -> None:
    guide = (repo_root / "deploy" / "README.md").read_text()
    code = guide.split("### Webhooks", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict[str, Any] = {}
    exec(code, scope)  # noqa: S102 (the guide's own example)
    secret, body, now = new_secret(), b'{"event": "mail.sent"}', int(time.time())
    headers = signed_headers(secret_bytes(secret), webhook_id("e", "wh_1"), now, body)
    assert scope["verify"](secret, headers, body)
    assert not scope["verify"](secret, headers, body + b" ")


def test_subscriptions_and_ids() -> None:
    assert {"mail.sent", "mail.failed", "mail.dead", "mail.deferred", "mail.bounced"} <= (
        known_events()
    )
    assert check_events(["mail.sent", "mail.failed", "mail.sent"]) == ["mail.failed", "mail.sent"]
    assert check_events([]) == ["*"]
    assert check_events(["mail.sent", "*"]) == ["*"]
    with pytest.raises(ValueError, match=r"mail\.exploded"):
        check_events(["mail.exploded"])
    assert webhook_id("event-1", "wh_a") == webhook_id("event-1", "wh_a")
    assert webhook_id("event-1", "wh_a") != webhook_id("event-1", "wh_b")


def test_what_follows_an_attempt() -> None:
    limits: dict[str, Any] = {"base": 5.0, "maximum": 60.0, "max_age": 100.0, "jitter": 0.0}
    assert next_step(Attempt(204), 1, 0, **limits).status == "delivered"
    assert next_step(Attempt(410, "HTTP 410"), 1, 0, **limits).status == "gone"
    assert next_step(Attempt(None, "private", refused=True), 1, 0, **limits).status == "refused"
    failed = next_step(Attempt(503, "HTTP 503"), 3, 10, **limits)
    assert (failed.status, failed.retry_in) == ("failed", 10.0)
    assert next_step(Attempt(None, "timeout"), 3, 95, **limits).status == "dead"


@pytest.mark.parametrize(
    "url", ["http://10.1.2.3/hook", "http://[::ffff:192.168.0.1]/", "https://169.254.169.254/"]
)
async def test_private_addresses_are_refused_before_connecting(url: str) -> None:
    poster = WebhookPoster(5.0)
    try:
        attempt = await poster.post(url, b"{}", {})
    finally:
        await poster.close()
    assert attempt.refused
    assert not attempt.delivered
    assert "MAILBUS_WEBHOOK_ALLOW_PRIVATE" in (attempt.error or "")


async def test_a_host_that_does_not_resolve_is_retried_not_given_up() -> None:
    # A receiver's DNS failing for a while must not lose its events.
    async def nxdomain(host: str, port: int) -> list[IPAddress]:
        raise AttachmentError(f"{host}: no such host (Name or service not known)")

    poster = WebhookPoster(5.0, resolver=nxdomain)
    try:
        attempt = await poster.post("https://hooks.example.com/mail", b"{}", {})
    finally:
        await poster.close()
    assert not attempt.refused
    assert "no such host" in (attempt.error or "")
    limits: dict[str, Any] = {"base": 5.0, "maximum": 60.0, "max_age": 100.0, "jitter": 0.0}
    assert next_step(attempt, 1, 0, **limits).status == "failed"


def hooked(settings: Settings, **update: Any) -> Settings:
    """The test's settings with a secret key and quick webhook retries."""
    return settings.model_copy(
        update={
            "secret_key": SecretStr(watched(new_key())),
            "webhook_retry_base_delay": 1.0,
            "webhook_retry_max_delay": 1.0,
            **update,
        }
    )


async def test_events_reach_their_webhooks_signed_retried_and_in_order(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = hooked(settings, webhook_allow_private=True, http_port=0)
    names = Names(settings.prefix)
    flaky_secret = watched(new_secret())
    async with receiving() as receiver:
        added = await cli(settings, capsys, "webhook", "add", "Example.COM", receiver.url("/all"))
        all_secret = watched(added.split("secret (shown once): ")[1].strip())
        await cli(
            settings,
            capsys,
            *("webhook", "add", "example.com", receiver.url("/flaky?token=t0ps3cret")),
            *("--event", "mail.sent", "--secret", flaky_secret),
        )
        await cli(settings, capsys, "webhook", "add", "other.example", receiver.url("/other"))
        receiver.secrets.update({"/all": all_secret, "/flaky": flaky_secret})
        receiver.answer["/flaky"] = lambda seen: 503 if seen < 2 else 200
        smtp.faults.refuse_rcpt("later@example.org", "451 4.3.0 try later")
        smtp.faults.refuse_rcpt("nobody@example.org", "550 5.1.1 unknown")
        async with webhook_service(settings) as service:
            worker = RunningWorker(settings.model_copy(update={"http_port": None}))
            try:
                await publish_job(channel, job(id="plain"), names=names)
                await publish_job(channel, job(id="later", to=["later@example.org"]), names=names)
                await publish_job(channel, job(id="gone", to=["nobody@example.org"]), names=names)

                async def everything() -> bool:
                    return len(receiver.delivered("/all")) >= 4 and (
                        len(receiver.delivered("/flaky")) >= 2
                    )

                await until(everything, 30)
            finally:
                await worker.shutdown()
            async with httpx.AsyncClient(timeout=10) as client:
                scraped = await client.get(f"http://127.0.0.1:{service.http_port}/metrics")
        logged = await cli(settings, capsys, "webhook", "log", "--domain", "example.com")
        listed = await cli(settings, capsys, "webhook", "ls")

    assert all(r.verified for r in receiver.requests), receiver.requests
    seen = [(r.event["id"], r.event["event"]) for r in receiver.delivered("/all")]
    assert sorted(seen) == [
        ("gone", "mail.failed"),
        ("later", "mail.deferred"),
        ("later", "mail.sent"),
        ("plain", "mail.sent"),
    ]
    # One job's events in the order they happened.
    assert [event for job_id, event in seen if job_id == "later"] == ["mail.deferred", "mail.sent"]
    # The flaky endpoint took mail.sent only; its two 503s were retried with the same ids.
    flaky = [r for r in receiver.requests if r.path == "/flaky"]
    delivered_ids = [r.webhook_id for r in receiver.delivered("/flaky")]
    assert sorted(r.event["id"] for r in receiver.delivered("/flaky")) == ["later", "plain"]
    assert len(set(delivered_ids)) == 2
    assert [r.status for r in flaky[:2]] == [503, 503]
    assert {r.webhook_id for r in flaky[:2]} <= set(delivered_ids)
    assert not [r for r in receiver.requests if r.path == "/other"]
    assert not set(delivered_ids) & {r.webhook_id for r in receiver.delivered("/all")}
    # The log shows each attempt; the listing shows no secret and no URL query.
    assert logged.count(" delivered ") == 6
    assert logged.count(" failed ") == 2
    assert "HTTP 503: not now" in logged
    assert "example.com" in listed
    assert "other.example" in listed
    assert "whsec_" not in listed
    assert "t0ps3cret" not in listed
    assert "t0ps3cret" not in logged
    # The service's /metrics counted the same.
    counted = {
        (s.name, tuple(s.labels.values())): s.value
        for family in text_string_to_metric_families(scraped.text)
        for s in family.samples
    }
    assert counted["mailbus_webhook_deliveries_total", ("delivered", "")] == 6
    assert counted["mailbus_webhook_deliveries_total", ("failed", "")] == 2
    assert counted["mailbus_webhook_attempt_seconds_count", ()] == 8


async def test_a_private_address_is_refused_and_given_up(
    settings: Settings, channel: AbstractChannel, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = hooked(settings)
    names = Names(settings.prefix)
    async with receiving() as receiver:
        added = await cli(settings, capsys, "webhook", "add", "example.com", receiver.url("/p"))
        watched(added.split("secret (shown once): ")[1].strip())
        endpoint = added.split()[1]
        async with webhook_service(settings):
            event = {"event": "mail.sent", "id": "p-1", "domain": "example.com", "attempts": 1}
            await publish_event(channel, settings, event)
            [letter] = await take(channel, names.webhooks_dead, 1)
        logged = await cli(settings, capsys, "webhook", "log")
        assert (await cli(settings, capsys, "webhook", "rm", endpoint)).startswith("webhook wh_")
        assert endpoint not in await cli(settings, capsys, "webhook", "ls")
    assert receiver.requests == []
    headers = letter.headers or {}
    assert (headers[REASON_HEADER], headers[WEBHOOK_HEADER]) == ("refused", endpoint)
    assert "loopback address 127.0.0.1" in str(headers[ERROR_HEADER])
    assert json.loads(letter.body) == event
    assert " refused " in logged
    assert "MAILBUS_WEBHOOK_ALLOW_PRIVATE" in logged


async def test_an_endpoint_failing_past_the_maximum_age_is_given_up(
    settings: Settings, channel: AbstractChannel, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = hooked(settings, webhook_allow_private=True, webhook_max_age=2.5)
    names = Names(settings.prefix)
    async with receiving() as receiver:
        receiver.answer["/down"] = lambda _: 503
        added = await cli(settings, capsys, "webhook", "add", "example.com", receiver.url("/down"))
        receiver.secrets["/down"] = watched(added.split("secret (shown once): ")[1].strip())
        async with webhook_service(settings):
            event = {"event": "mail.dead", "id": "d-1", "domain": "example.com", "attempts": 0}
            await publish_event(channel, settings, event)
            [letter] = await take(channel, names.webhooks_dead, 1)
        logged = await cli(settings, capsys, "webhook", "log", "--limit", "10")
    headers = letter.headers or {}
    tried = len(receiver.requests)
    assert headers[REASON_HEADER] == "expired"
    assert headers[ATTEMPTS_HEADER] == tried
    assert tried >= 2
    assert len({r.webhook_id for r in receiver.requests}) == 1
    assert all(r.verified for r in receiver.requests)
    assert logged.count(" failed ") == tried - 1
    assert logged.count(" dead ") == 1


async def test_an_event_mailbus_did_not_seal_is_never_posted(
    settings: Settings, channel: AbstractChannel, capsys: pytest.CaptureFixture[str]
) -> None:
    # Whoever may publish to the events exchange (a producer's broker user, say) must not
    # have an event POSTed to a domain's webhooks, signed with that domain's secret.
    settings = hooked(settings, webhook_allow_private=True)
    names = Names(settings.prefix)
    async with receiving() as receiver:
        added = await cli(settings, capsys, "webhook", "add", "example.com", receiver.url("/v"))
        watched(added.split("secret (shown once): ")[1].strip())
        async with webhook_service(settings):
            events = await channel.get_exchange(names.events, ensure=False)
            forged = {"event": "mail.sent", "id": "f-1", "domain": "example.com", "attempts": 1}
            body = json.dumps(forged).encode()
            other_key = Vault([new_key()]).sign(event_seal_input("e-f", body))
            for headers in ({}, {EVENT_SEAL_HEADER: other_key}):
                await events.publish(
                    aio_pika.Message(body, message_id="e-f", headers=headers),
                    routing_key="mail.sent",
                )
            letters = await take(channel, names.webhooks_dead, 2)
    assert receiver.requests == []
    assert [(m.headers or {})[REASON_HEADER] for m in letters] == ["invalid", "invalid"]
    assert "seal" in str((letters[0].headers or {})[ERROR_HEADER])


async def test_a_delivery_cancelled_while_it_waits_its_turn_leaves_the_one_before_whole(
    settings: Settings,
) -> None:
    # On shutdown, deliveries still waiting behind another of their job are cancelled:
    # the one they wait for must still finish cleanly.
    settings = hooked(settings)
    service = WebhookService(
        settings, Mongo.connect(settings), Vault.from_settings(settings), WebhookPoster(1.0)
    )
    gate, ran = asyncio.Event(), []

    async def first() -> None:
        await gate.wait()
        ran.append("first")

    async def second() -> None:
        ran.append("second")

    try:
        before = asyncio.create_task(service._in_order("job-1", first()))
        await asyncio.sleep(0)
        waiting = asyncio.create_task(service._in_order("job-1", second()))
        await asyncio.sleep(0)
        waiting.cancel()
        gate.set()
        await before
        with pytest.raises(asyncio.CancelledError):
            await waiting
    finally:
        await service._close()
    assert ran == ["first"]
    assert service._tails == {}
