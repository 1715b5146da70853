"""Reading the dead-letter queues, the jobs' and the webhooks': what each dead letter
says, browsing without losing any, and the copy a replay publishes.

A queue cannot be read without taking messages, so browsing takes them unacknowledged and
hands back every one it does not settle (``nack`` with requeue) before it returns.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from consumer.amqp.outgoing import copy_of
from consumer.core.headers import (
    ATTEMPTS_HEADER,
    CODE_HEADER,
    DEAD_AT_HEADER,
    DELAY_HEADER,
    DUE_HEADER,
    ERROR_HEADER,
    REASON_HEADER,
    SEAL_HEADER,
    WEBHOOK_HEADER,
)
from consumer.core.ratelimit import PERIODS
from consumer.core.schedule import own_headers

# Headers a replayed copy starts without: why it died, and any wait it had.
_DEATH_HEADERS = (REASON_HEADER, ERROR_HEADER, ATTEMPTS_HEADER, CODE_HEADER, DEAD_AT_HEADER)
_WAIT_HEADERS = (DELAY_HEADER, DUE_HEADER)
SECRET_FIELDS = ("domain_key",)


@dataclass(frozen=True)
class DeadLetter:
    """What a dead letter says about itself."""

    job_id: str | None
    reason: str
    error: str | None
    domain: str | None
    dead_at: datetime | None
    attempts: int | None
    smtp_code: int | None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _body(message: AbstractIncomingMessage) -> dict[str, Any] | None:
    try:
        body = json.loads(message.body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def _broker_death(headers: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The broker's own dead-lettering of the message (a delivery limit), if that is how
    it got here: the ``x-death`` entry whose reason is not a ladder step's ``expired``.
    """
    for entry in headers.get("x-death") or []:
        if isinstance(entry, Mapping) and _text(entry.get("reason")) != "expired":
            return entry
    return None


def read(message: AbstractIncomingMessage) -> DeadLetter:
    """Describe one dead letter from its headers and body (pure)."""
    headers = message.headers or {}
    body = _body(message) or {}
    reason = _text(headers.get(REASON_HEADER))
    dead_at: datetime | None = None
    dead_ms = headers.get(DEAD_AT_HEADER)
    if isinstance(dead_ms, int):
        dead_at = datetime.fromtimestamp(dead_ms / 1000, UTC)
    if reason is None:
        death = _broker_death(headers)
        reason = _text(death.get("reason")) if death else None
        when = death.get("time") if death else None
        if isinstance(when, datetime):
            dead_at = when if when.tzinfo else when.replace(tzinfo=UTC)
    attempts, code = headers.get(ATTEMPTS_HEADER), headers.get(CODE_HEADER)
    body_id, domain = body.get("id"), body.get("domain")
    return DeadLetter(
        job_id=body_id if isinstance(body_id, str) else message.message_id,
        reason=reason or "unknown",
        error=_text(headers.get(ERROR_HEADER)),
        domain=domain if isinstance(domain, str) else None,
        dead_at=dead_at,
        attempts=attempts if isinstance(attempts, int) else None,
        smtp_code=code if isinstance(code, int) else None,
    )


@dataclass(frozen=True)
class WebhookDeadLetter:
    """A webhook delivery given up on: the endpoint it was for (None: the broker gave up
    on the event itself, before any endpoint), the event's type, and the dead letter.
    ``id`` names it for ``mailbus webhook replay``: the ``webhook-id`` its endpoint was
    sent (``msg_…``), or the event's message id when it names no endpoint.
    """

    id: str
    endpoint: str | None
    event: str | None
    letter: DeadLetter


def is_webhook_letter(message: AbstractIncomingMessage) -> bool:
    """Whether a dead letter is a webhook delivery (it names an endpoint, or its body is an
    event), never to be replayed as a job; any other is a job's, never replayed as a
    webhook delivery.
    """
    event = (_body(message) or {}).get("event")
    return WEBHOOK_HEADER in (message.headers or {}) or isinstance(event, str)


def read_webhook(message: AbstractIncomingMessage, webhook_id: str) -> WebhookDeadLetter:
    """Describe one webhook dead letter (pure); ``webhook_id`` is the id its endpoint was
    sent, or the event's message id when it names none.
    """
    endpoint = _text((message.headers or {}).get(WEBHOOK_HEADER))
    event = (_body(message) or {}).get("event")
    return WebhookDeadLetter(
        id=webhook_id,
        endpoint=endpoint,
        event=event if isinstance(event, str) else None,
        letter=read(message),
    )


def shown(message: AbstractIncomingMessage) -> dict[str, Any]:
    """A dead letter whole, fit for printing: properties, headers and the body (JSON when it
    is, else text), with secrets such as ``domain_key`` masked.
    """
    body: Any = _body(message)
    if body is not None:
        body = {k: ("***" if k in SECRET_FIELDS else v) for k, v in body.items()}
    else:
        body = message.body.decode("utf-8", "replace")
    headers = {
        k: "***" if k == SEAL_HEADER else _plain(v) for k, v in (message.headers or {}).items()
    }
    return {
        "message_id": message.message_id,
        "content_type": message.content_type,
        "timestamp": message.timestamp,
        "user_id": message.user_id,
        "headers": headers,
        "body": body,
    }


def _plain(value: Any) -> Any:
    """Header values as JSON can print them (bytes as text, nested tables and lists too)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def replay_copy(message: AbstractIncomingMessage) -> aio_pika.Message:
    """The copy of a dead letter that goes back to the send queue: its own headers without
    the cause of death or any wait, so it is taken now. The authorization it carries stays
    under its seal, which covers the message id and the body, both unchanged.
    """
    headers = own_headers(message.headers or {})
    for name in (*_DEATH_HEADERS, *_WAIT_HEADERS):
        headers.pop(name, None)
    return copy_of(message, headers)


@asynccontextmanager
async def browse(
    channel: AbstractChannel, queue_name: str, limit: int
) -> AsyncIterator[list[AbstractIncomingMessage]]:
    """Up to ``limit`` messages of the queue, oldest first, held unacknowledged; whatever
    the caller did not ack is handed back when the block ends.
    """
    queue = await channel.get_queue(queue_name, ensure=False)
    held: list[AbstractIncomingMessage] = []
    try:
        while len(held) < limit:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            held.append(message)
        yield held
    finally:
        for message in held:
            if not message.processed:
                await message.nack(requeue=True)


def parse_age(text: str) -> timedelta:
    """``7d``, ``12h``, ``30min``, ``90s``: an age for ``mailbus dead purge --older-than``."""
    found = re.fullmatch(r"\s*(\d+)\s*([a-z]+?)s?\s*", text.lower())
    if found is None or found[2] not in PERIODS:
        raise ValueError(f"an age looks like 7d, 12h, 30min or 90s, not {text!r}")
    return timedelta(seconds=int(found[1]) * PERIODS[found[2]])
