"""When a job is due: ``x-delay`` (relative ms), the worker's due header, or ``send_at``."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from consumer.core.headers import BROKER_HEADERS, DELAY_HEADER, DUE_HEADER
from consumer.core.message import LATEST_SEND_AT, Job
from consumer.core.refusals import InvalidJobError
from consumer.core.vocabulary import LaterWhy

MAX_DELAY_MS = (2**28 - 1) * 1000
# A job held in memory until it is due is claimed this long before, then sent at its
# time: its record's round trips to MongoDB are then off the moment it is due. It can be
# cancelled or moved until it is claimed.
CLAIM_AHEAD = timedelta(milliseconds=500)


def claims_ahead(why: LaterWhy) -> bool:
    """Whether a job held for ``why`` is claimed :data:`CLAIM_AHEAD` of its time: one
    waiting for its due time, its retry or its token is; one waiting for another
    worker's lease (never taken early) or for MongoDB is not.
    """
    match why:
        case "scheduled" | "waiting" | "retry" | "rate_limited":
            return True
        case "leased" | "store":
            return False


def _milliseconds(headers: Mapping[str, Any], name: str) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise InvalidJobError(f"header {name} must be an integer of milliseconds") from None
    if value < 0:
        raise InvalidJobError(f"header {name} must not be negative")
    return value


def due_time(job: Job, headers: Mapping[str, Any], received_at: datetime) -> datetime | None:
    """The absolute time the job may be sent, or None for "now"."""
    due_ms = _milliseconds(headers, DUE_HEADER)
    if due_ms is not None:
        if due_ms >= to_epoch_ms(LATEST_SEND_AT):
            raise InvalidJobError(f"header {DUE_HEADER} is later than {LATEST_SEND_AT:%Y}")
        return datetime.fromtimestamp(due_ms / 1000, UTC)
    delay_ms = _milliseconds(headers, DELAY_HEADER)
    if delay_ms is not None:
        if delay_ms > MAX_DELAY_MS:
            raise InvalidJobError(f"{DELAY_HEADER} exceeds the maximum of {MAX_DELAY_MS} ms")
        return received_at + timedelta(milliseconds=delay_ms) if delay_ms else None
    return job.send_at


def to_epoch_ms(when: datetime) -> int:
    """``when`` as integer epoch milliseconds, the form of :data:`DUE_HEADER`."""
    return round(when.timestamp() * 1000)


def own_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """``headers`` without those the broker added on the way."""
    return {name: value for name, value in headers.items() if name not in BROKER_HEADERS}


def carried_headers(headers: Mapping[str, Any], due: datetime) -> dict[str, Any]:
    """The headers of a job's next copy: the absolute due time replaces ``x-delay``."""
    carried = own_headers(headers)
    carried.pop(DELAY_HEADER, None)
    carried[DUE_HEADER] = to_epoch_ms(due)
    return carried
