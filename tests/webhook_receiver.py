"""A webhook receiver on 127.0.0.1 (aiohttp, in the test's event loop) that verifies each
request as a Standard Webhooks receiver would, with its own code (not mailbus's), and the
webhook service run in the test's loop as `mailbus webhook serve` runs it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel
from aiohttp import web

from consumer.amqp.outgoing import Outgoing
from consumer.core.names import Names
from consumer.service.webhooks import WebhookService
from consumer.settings import Settings
from consumer.vault import Vault

# How far a request's timestamp may be from the receiver's clock (the specification's
# libraries allow five minutes).
TOLERANCE_SECONDS = 300


def verified(secret: str, headers: Any, body: bytes) -> bool:
    """Whether a request carries a valid Standard Webhooks signature for ``secret``: one
    of the space-separated ``v1,`` entries of ``webhook-signature`` is the base64
    HMAC-SHA256 of ``id.timestamp.body``, and the timestamp is recent.
    """
    msg_id, stamp = headers.get("webhook-id"), headers.get("webhook-timestamp")
    if not msg_id or not stamp or not stamp.isdigit():
        return False
    if abs(time.time() - int(stamp)) > TOLERANCE_SECONDS:
        return False
    key = base64.b64decode(secret.split("_", 1)[1])
    mac = hmac.new(key, msg_id.encode() + b"." + stamp.encode() + b"." + body, hashlib.sha256)
    expected = base64.b64encode(mac.digest()).decode()
    offered = [
        entry.split(",", 1)[1]
        for entry in headers.get("webhook-signature", "").split(" ")
        if entry.startswith("v1,")
    ]
    return any(hmac.compare_digest(expected, sig) for sig in offered)


@dataclass
class Request:
    """One request the receiver answered."""

    path: str
    webhook_id: str
    event: dict[str, Any]
    status: int
    verified: bool


@dataclass
class Receiver:
    """The receiver's routes: each path's secret and how it answers (by the number of
    requests it has had before, from 0).
    """

    secrets: dict[str, str] = field(default_factory=dict)
    answer: dict[str, Callable[[int], int]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    port: int = 0

    def url(self, path: str) -> str:
        """The URL of ``path`` on this receiver."""
        return f"http://127.0.0.1:{self.port}{path}"

    def delivered(self, path: str) -> list[Request]:
        """The requests to ``path`` answered 2xx, in order."""
        return [r for r in self.requests if r.path == path and 200 <= r.status < 300]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        path = request.path
        seen = sum(1 for r in self.requests if r.path == path)
        status = self.answer.get(path, lambda _: 204)(seen)
        ok = verified(self.secrets.get(path, "whsec_"), request.headers, body)
        self.requests.append(
            Request(path, request.headers.get("webhook-id", ""), json.loads(body), status, ok)
        )
        return web.Response(status=status, text="" if status < 300 else "not now")


@contextlib.asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    """A receiver listening on 127.0.0.1 until the block ends."""
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", receiver._handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.port = runner.addresses[0][1]
    try:
        yield receiver
    finally:
        await runner.cleanup()


async def publish_event(
    channel: AbstractChannel, settings: Settings, event: dict[str, Any]
) -> None:
    """Publish ``event`` on the events exchange as a worker does (sealed with the
    settings' MAILBUS_SECRET_KEY).
    """
    names = Names(settings.prefix)
    outgoing = await Outgoing.open(channel, names, vault=Vault.from_settings(settings))
    await outgoing.event(event["event"], event)


@contextlib.asynccontextmanager
async def webhook_service(settings: Settings) -> AsyncIterator[WebhookService]:
    """`mailbus webhook serve` in the test's loop until the block ends (then stopped as on
    SIGTERM); its queues are deleted afterwards.
    """
    service = WebhookService.from_settings(settings)
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(service.run(stop, started))
    try:
        async with asyncio.timeout(20):
            await asyncio.wait(
                {task, asyncio.create_task(started.wait())}, return_when=asyncio.FIRST_COMPLETED
            )
        if task.done():
            await task  # raises why it stopped
        yield service
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await task
        names = Names(settings.prefix)
        async with await aio_pika.connect(settings.amqp_url.get_secret_value()) as connection:
            channel = await connection.channel()
            for queue in (names.webhooks_queue, names.webhooks_dead):
                await channel.queue_delete(queue)
