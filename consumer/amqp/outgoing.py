"""What mailbus itself publishes: copies of jobs into the delay ladder, dead letters, events
and replies. Every publish waits for the broker's confirm when the channel has confirms on.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

from consumer.clock import utcnow
from consumer.core import ladder
from consumer.core.headers import (
    ATTEMPTS_HEADER,
    CODE_HEADER,
    DEAD_AT_HEADER,
    ERROR_HEADER,
    EVENT_SEAL_HEADER,
    REASON_HEADER,
)
from consumer.core.message import json_body
from consumer.core.names import SEND_KEY, Names, is_reply_queue
from consumer.core.schedule import own_headers, to_epoch_ms
from consumer.core.webhooks import event_seal_input
from consumer.logging import get_logger
from consumer.vault import Vault

log = get_logger(__name__)


def copy_of(
    message: AbstractIncomingMessage,
    headers: Mapping[str, Any],
    body: bytes | None = None,
    message_id: str | None = None,
) -> aio_pika.Message:
    """A persistent copy of ``message`` with new headers, and a new body and message id if
    given (``user_id`` cannot be re-asserted). A copy whose body changed names its job
    by ``message_id``: an id derived from the body would change with it.
    """
    return aio_pika.Message(
        message.body if body is None else body,
        headers=dict(headers),
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id or message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


class Outgoing:
    """The exchanges mailbus publishes to, looked up by name without a round trip."""

    def __init__(
        self,
        channel: AbstractChannel,
        jobs: AbstractExchange,
        ladder_top: AbstractExchange,
        dead: AbstractExchange,
        events: AbstractExchange,
        *,
        dead_letter_days: float = 0,
        reply_prefix: str | None = None,
        vault: Vault | None = None,
    ) -> None:
        self.channel = channel
        self.jobs = jobs
        self.ladder_top = ladder_top
        self.dead = dead
        self.events = events
        self.dead_letter_days = dead_letter_days
        self.reply_prefix = reply_prefix
        self.vault = vault  # seals events (MAILBUS_SECRET_KEY's), when there is one

    @classmethod
    async def open(
        cls,
        channel: AbstractChannel,
        names: Names,
        *,
        dead_letter_days: float = 0,
        reply_prefix: str | None = None,
        vault: Vault | None = None,
    ) -> Outgoing:
        """Bind to the exchanges of ``names`` on ``channel`` (declared elsewhere); dead
        letters published expire after ``dead_letter_days`` (0: never); replies go to
        RabbitMQ's direct reply-to or to queues named with ``reply_prefix``; events are
        sealed with ``vault`` (the webhook service delivers no others).
        """
        return cls(
            channel,
            await channel.get_exchange(names.exchange, ensure=False),
            await channel.get_exchange(names.delay(ladder.TOP), ensure=False),
            await channel.get_exchange(names.dead, ensure=False),
            await channel.get_exchange(names.events, ensure=False),
            dead_letter_days=dead_letter_days,
            reply_prefix=reply_prefix,
            vault=vault,
        )

    async def delay(
        self, message: aio_pika.Message, due: datetime, destination: str, now: datetime
    ) -> None:
        """Send ``message`` down the ladder so it reaches ``destination`` just before ``due``.

        A wait shorter than the ladder's resolution goes straight to ``destination``.
        """
        seconds = ladder.route((due - now).total_seconds()).ladder_seconds or 0
        await self.after(message, seconds, destination)

    async def after(self, message: aio_pika.Message, seconds: int, destination: str) -> None:
        """Send ``message`` down the ladder to reach ``destination`` in ``seconds`` (whole)."""
        key = ladder.routing_key(seconds, destination)
        await self.ladder_top.publish(message, routing_key=key, mandatory=True)

    async def dead_letter(
        self,
        message: AbstractIncomingMessage,
        body: bytes,
        headers: Mapping[str, Any],
        reason: str,
        error: str,
        attempts: int,
        code: int | None,
        message_id: str | None = None,
    ) -> None:
        """Publish ``body`` with ``headers`` (what is left of ``message`` once its secrets
        are out) to the dead-letter exchange, saying why; ``message_id`` names its job.
        """
        marked = _dead_marks(headers, reason, error, attempts)
        if code is not None:
            marked[CODE_HEADER] = code
        letter = self._letter(copy_of(message, marked, body, message_id))
        await self.dead.publish(letter, routing_key=reason, mandatory=True)

    async def webhook_dead_letter(
        self,
        message: AbstractIncomingMessage,
        headers: Mapping[str, Any],
        queue: str,
        reason: str,
        error: str,
        attempts: int,
    ) -> None:
        """Publish a webhook delivery given up on (the event ``message``, ``headers`` naming
        its endpoint) to the webhooks' dead-letter ``queue``, saying why.
        """
        marked = _dead_marks(headers, reason, error, attempts)
        letter = self._letter(copy_of(message, marked))
        await self.channel.default_exchange.publish(letter, routing_key=queue, mandatory=True)

    def _letter(self, letter: aio_pika.Message) -> aio_pika.Message:
        if self.dead_letter_days > 0:
            # Per-message TTL: retention without a cron, and without queue arguments that
            # could never change on an existing queue. A replayed copy does not keep it.
            letter.expiration = self.dead_letter_days * 86400
        return letter

    async def job(self, message: aio_pika.Message) -> None:
        """Publish a job mailbus makes itself (an admin digest) to the send queue."""
        await self.jobs.publish(message, routing_key=SEND_KEY, mandatory=True)

    async def event(self, key: str, body: Mapping[str, Any]) -> None:
        """Publish one ``mail.*`` event, sealed when there is a vault; one that no queue is
        bound for is dropped by the broker, not returned: events go to whoever subscribes,
        and nobody may.
        """
        data, message_id = json_body(body), str(uuid.uuid4())
        headers: dict[str, Any] = {}
        if self.vault is not None:
            headers[EVENT_SEAL_HEADER] = self.vault.sign(event_seal_input(message_id, data))
        event = aio_pika.Message(
            data,
            headers=headers,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            type=key,
        )
        await self.events.publish(event, routing_key=key, mandatory=False)

    async def reply(self, message: AbstractIncomingMessage, body: Mapping[str, Any]) -> None:
        """Answer the ``reply_to`` of ``message`` (a no-op when it has none). Only a reply
        queue is answered: any other name would let a producer write into any queue.
        """
        if not message.reply_to:
            return
        if not is_reply_queue(message.reply_to, self.reply_prefix):
            log.warning("reply.refused", reply_to=message.reply_to[:200])
            return
        answer = aio_pika.Message(
            json_body(body),
            content_type="application/json",
            correlation_id=message.correlation_id,
        )
        await self.channel.default_exchange.publish(answer, routing_key=message.reply_to)


def _dead_marks(
    headers: Mapping[str, Any], reason: str, error: str, attempts: int
) -> dict[str, Any]:
    """A dead letter's headers: its own, and why, the last error, attempts and when."""
    return {
        **own_headers(headers),
        REASON_HEADER: reason,
        ERROR_HEADER: error[:1000],
        ATTEMPTS_HEADER: attempts,
        DEAD_AT_HEADER: to_epoch_ms(utcnow()),
    }
