"""Mail submitted over SMTP, as raw v1 jobs: the ``X-Mailbus-*`` header fields that steer a
job (read, then removed before sending), and the job itself. Pure functions, no I/O.

Only the header fields removed change in the message: every other byte is sent as it came,
so that a signature made before submission still holds.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import AwareDatetime, TypeAdapter, ValidationError

from consumer.core.message import MAX_TAGS
from consumer.core.raw import MAX_HEADER_BYTES
from consumer.errors import GatewayRequestError

SMTP_TAG = "gateway:smtp"
STEERING_PREFIX = b"x-mailbus-"
# The steering fields, by their lower-case names.
SEND_AT, DELAY, JOB_ID, TAGS, EXPIRES_AT, UNSUBSCRIBE, UNSUBSCRIBE_MAILTO = (
    "x-mailbus-send-at",
    "x-mailbus-delay",
    "x-mailbus-id",
    "x-mailbus-tags",
    "x-mailbus-expires-at",
    "x-mailbus-unsubscribe",
    "x-mailbus-unsubscribe-mailto",
)
STEERING = frozenset({SEND_AT, DELAY, JOB_ID, TAGS, EXPIRES_AT, UNSUBSCRIBE, UNSUBSCRIBE_MAILTO})
# The longest delay a job may ask for: the delay ladder's (2^28 - 1 seconds).
MAX_DELAY_SECONDS = 2**28 - 1
# The end of the header section: the last field's line end, then the empty line.
_HEADER_END = re.compile(rb"\r?\n(\r?\n)")
_LINE = re.compile(rb"[^\n]*\n|[^\n]+")
_ID = re.compile(r"[!-~]{1,200}")
_WHEN: TypeAdapter[datetime] = TypeAdapter(AwareDatetime)


@dataclass(frozen=True)
class Steering:
    """What a message's ``X-Mailbus-*`` fields ask of its job."""

    job_id: str | None = None
    send_at: datetime | None = None
    expires_at: datetime | None = None
    tags: tuple[str, ...] = ()
    # The job's ``unsubscribe`` field (``list``, ``mailto``): checked with the job.
    unsubscribe: dict[str, str] | None = None


def split_steering(message: bytes) -> tuple[bytes, dict[str, str]]:
    """``message`` without its ``X-Mailbus-*`` header fields (each with its folded
    continuation lines), and their unfolded values by lower-case name (the last of a name
    wins). Every other byte is kept as it was.
    """
    end = _HEADER_END.search(message)
    head, rest = (message[: end.start(1)], message[end.start(1) :]) if end else (message, b"")
    if len(head) > MAX_HEADER_BYTES:  # bounded before it is read
        raise GatewayRequestError(f"a header section over {MAX_HEADER_BYTES} bytes")
    kept: list[bytes] = []
    parts: dict[str, list[bytes]] = {}
    dropping: list[bytes] | None = None  # the parts of the steering field being read
    for line in _LINE.findall(head):
        if line[:1] in (b" ", b"\t"):  # a continuation of the field above
            if dropping is not None:
                dropping.append(line.strip())
            else:
                kept.append(line)
            continue
        name, colon, value = line.partition(b":")
        key = name.strip().lower()
        if colon and key.startswith(STEERING_PREFIX):
            dropping = parts[key.decode("ascii", "replace")] = [value.strip()]
        else:
            dropping = None
            kept.append(line)
    fields = {key: b" ".join(value).decode("utf-8", "replace") for key, value in parts.items()}
    return b"".join(kept) + rest, fields


def _time(value: str, name: str) -> datetime:
    try:
        return _WHEN.validate_python(value)
    except ValidationError:
        raise GatewayRequestError(
            f"{name}: an RFC 3339 time with a time zone (2030-01-01T09:00:00+01:00)"
        ) from None


def read_steering(fields: Mapping[str, str], now: datetime) -> Steering:
    """What the steering ``fields`` ask, checked; :class:`GatewayRequestError` names the
    field that cannot be read. Unknown ``X-Mailbus-*`` fields are refused too: a typo must
    not pass for an instruction followed.
    """
    unknown = sorted(set(fields) - STEERING)
    if unknown:
        raise GatewayRequestError(f"unknown steering header(s): {', '.join(unknown)}")
    send_at = _time(fields[SEND_AT], "X-Mailbus-Send-At") if SEND_AT in fields else None
    if DELAY in fields:
        if send_at is not None:
            raise GatewayRequestError("give X-Mailbus-Send-At or X-Mailbus-Delay, not both")
        try:
            delay = float(fields[DELAY])
        except ValueError:
            delay = -1.0
        if not 0 <= delay <= MAX_DELAY_SECONDS:
            raise GatewayRequestError(f"X-Mailbus-Delay: seconds, 0 to {MAX_DELAY_SECONDS}")
        send_at = now + timedelta(seconds=delay)
    job_id = fields.get(JOB_ID)
    if job_id is not None and not _ID.fullmatch(job_id):
        raise GatewayRequestError("X-Mailbus-Id: 1 to 200 visible ASCII characters")
    tags = tuple(tag.strip() for tag in fields.get(TAGS, "").split(",") if tag.strip())
    if len(tags) >= MAX_TAGS or any(len(tag) > 100 for tag in tags):
        raise GatewayRequestError(
            f"X-Mailbus-Tags: fewer than {MAX_TAGS} tags of at most 100 characters"
        )
    expires_at = _time(fields[EXPIRES_AT], "X-Mailbus-Expires-At") if EXPIRES_AT in fields else None
    unsubscribe = None
    if UNSUBSCRIBE in fields:
        unsubscribe = {"list": fields[UNSUBSCRIBE]}
        if UNSUBSCRIBE_MAILTO in fields:
            unsubscribe["mailto"] = fields[UNSUBSCRIBE_MAILTO]
    elif UNSUBSCRIBE_MAILTO in fields:
        raise GatewayRequestError(
            "X-Mailbus-Unsubscribe-Mailto goes with X-Mailbus-Unsubscribe (the list)"
        )
    return Steering(job_id, send_at, expires_at, tags, unsubscribe)


def submission_id(domain: str, mail_from: str, rcpt_to: Sequence[str], message: bytes) -> str:
    """The job id of a submission that names none: the same message to the same envelope
    is the same job, so a client resending after an answer it never got (a broker that
    stored the job but could not confirm it) does not send it twice.
    """
    digest = hashlib.sha256()
    for part in (domain, mail_from, *rcpt_to):
        digest.update(part.lower().encode() + b"\0")
    digest.update(message)
    return "smtp:" + digest.hexdigest()


def raw_job(
    *,
    domain: str,
    mail_from: str,
    rcpt_to: Sequence[str],
    message: bytes,
    steering: Steering,
) -> dict[str, Any]:
    """The raw v1 job of a message submitted for ``domain`` with its envelope."""
    job: dict[str, Any] = {
        "id": steering.job_id or submission_id(domain, mail_from, rcpt_to, message),
        "domain": domain,
        "mail_from": mail_from,
        "rcpt_to": list(rcpt_to),
        "raw_b64": base64.b64encode(message).decode("ascii"),
        "tags": [SMTP_TAG, *steering.tags],
    }
    if steering.send_at is not None:
        job["send_at"] = steering.send_at.isoformat()
    if steering.expires_at is not None:
        job["expires_at"] = steering.expires_at.isoformat()
    if steering.unsubscribe is not None:
        job["unsubscribe"] = steering.unsubscribe
    return job
