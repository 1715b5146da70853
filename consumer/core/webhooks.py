"""Webhooks, the pure part: which events an endpoint takes, its secret, the Standard
Webhooks signature, and what a delivery attempt ends in.

An event is POSTed as it was published on ``mailbus.events``, signed as the Standard
Webhooks specification says (https://www.standardwebhooks.com): ``webhook-id`` (the same
for every attempt at one event to one endpoint, so a receiver drops what it has seen),
``webhook-timestamp`` (the attempt's time, seconds) and ``webhook-signature``
(``v1,`` and the base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}`` with the secret's bytes).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, get_args
from urllib.parse import urlsplit

from consumer.core.event_contract import EventBody
from consumer.core.retry import compute_backoff
from consumer.core.vocabulary import WebhookStatus

SECRET_PREFIX: Final = "whsec_"  # noqa: S105 (the form's prefix, not a secret)
# The specification's bounds on a secret's bytes.
MIN_SECRET_BYTES: Final = 24
MAX_SECRET_BYTES: Final = 64
ANY_EVENT: Final = "*"
MAX_URL_LENGTH: Final = 2048
# The ladder's destination word for webhook retries (``consumer.core.ladder``).
DESTINATION: Final = "webhook"
# What an event's seal covers first: no other value mailbus signs passes for one.
_EVENT_SEAL_PURPOSE: Final = b"mailbus event v1\0"


def contract_events() -> frozenset[str]:
    """Every event type the events contract (``core/event_contract.py``) names."""
    models = get_args(get_args(EventBody)[0])
    return frozenset(
        name for model in models for name in get_args(model.model_fields["event"].annotation)
    )


def known_events() -> frozenset[str]:
    """The event types an endpoint may subscribe to (besides ``*``)."""
    return contract_events()


def check_events(names: Iterable[str]) -> list[str]:
    """``names`` as an endpoint's subscription, sorted and without repeats; ValueError for
    a name that is neither a known event type nor ``*``.
    """
    wanted = sorted(set(names)) or [ANY_EVENT]
    unknown = [name for name in wanted if name != ANY_EVENT and name not in known_events()]
    if unknown:
        raise ValueError(
            f"unknown event type(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known_events()))} or {ANY_EVENT}"
        )
    return [ANY_EVENT] if ANY_EVENT in wanted else wanted


def subscribed(events: Iterable[str], event: str) -> bool:
    """Whether an endpoint subscribed to ``events`` takes ``event``."""
    return any(name in (ANY_EVENT, event) for name in events)


def check_url(url: str) -> str:
    """``url`` if it can be an endpoint (http or https, a host, bounded); else ValueError.
    Its addresses are checked at every delivery, where they are resolved.
    """
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"a webhook URL has at most {MAX_URL_LENGTH} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("a webhook URL is http:// or https:// with a host")
    return url


def new_secret() -> str:
    """A fresh endpoint secret: ``whsec_`` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_bytes(secret: str) -> bytes:
    """The key a ``whsec_`` secret stands for; ValueError when it is not one."""
    if not secret.startswith(SECRET_PREFIX) or len(secret) > 200:
        raise ValueError("a webhook secret is 'whsec_' and base64")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error:
        raise ValueError("a webhook secret is 'whsec_' and base64") from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise ValueError(
            f"a webhook secret holds {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, not {len(key)}"
        )
    return key


def event_seal_input(message_id: str, body: bytes) -> bytes:
    """What the seal of an event mailbus published covers: its message id and its body."""
    return _EVENT_SEAL_PURPOSE + message_id.encode() + b"\0" + body


def webhook_id(event_id: str, endpoint_id: str) -> str:
    """The ``webhook-id`` of one event sent to one endpoint: the same on every attempt."""
    digest = hashlib.sha256(f"{event_id}\0{endpoint_id}".encode()).hexdigest()
    return f"msg_{digest[:32]}"


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,`` and the base64 HMAC-SHA256 of
    ``{msg_id}.{timestamp}.{body}`` with ``key``.
    """
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def signed_headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one attempt, signed."""
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(key, msg_id, timestamp, body),
    }


@dataclass(frozen=True)
class Attempt:
    """What one POST ended in: an HTTP status, or an error before any (``status`` None);
    ``refused``: the URL can never be delivered to (a private address, a bad URL).
    """

    status: int | None
    error: str | None = None
    refused: bool = False

    @property
    def delivered(self) -> bool:
        """Any 2xx answer."""
        return self.status is not None and 200 <= self.status < 300


@dataclass(frozen=True)
class Next:
    """After an attempt: what to record, and the retry's wait in seconds (None: no retry)."""

    status: WebhookStatus
    retry_in: float | None = None


def next_step(
    attempt: Attempt,
    number: int,
    age: float,
    *,
    base: float,
    maximum: float,
    max_age: float,
    jitter: float,
) -> Next:
    """What follows attempt ``number`` (1-based) of an event first tried ``age`` seconds
    ago: delivered; ``gone`` (410: the endpoint is turned off); ``refused``; a retry after
    the backoff while it stays within ``max_age``; else ``dead``.
    """
    if attempt.delivered:
        return Next("delivered")
    if attempt.status == 410:
        return Next("gone")
    if attempt.refused:
        return Next("refused")
    wait = max(1.0, compute_backoff(number, base, maximum, jitter))
    if age + wait > max_age:
        return Next("dead")
    return Next("failed", wait)
