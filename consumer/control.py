"""Cancel and reschedule: the control-message contract and the two operations.

The job's MongoDB record is the truth; messages already in the ladder are never chased.
A copy of a cancelled job is dropped when it comes round. A job moved later is carried on
by its old copy, which finds the new due time in the record; a job moved earlier gets a new
copy, published here, and the old one finds the job sent when it arrives.

The CLI (``mailbus jobs cancel|reschedule``) and workers (for control messages published
with routing key ``control``) run the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aio_pika
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from consumer.errors import InvalidJobError
from consumer.events import cancelled_event, rescheduled_event
from consumer.message import json_object
from consumer.outgoing import Outgoing
from consumer.schedule import DUE_HEADER, to_epoch_ms
from consumer.store import JobStore
from consumer.topology import SEND_KEY

JobId = Field(min_length=1, max_length=200)


class CancelRequest(BaseModel):
    """``{"cancel": ID}``: never send this job."""

    model_config = ConfigDict(extra="forbid")
    cancel: str = JobId


class RescheduleRequest(BaseModel):
    """``{"reschedule": ID, "send_at": RFC3339}``: send this scheduled job at another time."""

    model_config = ConfigDict(extra="forbid")
    reschedule: str = JobId
    send_at: AwareDatetime


Request = CancelRequest | RescheduleRequest


def parse_request(body: bytes) -> Request:
    """Decode a control message; anything else is an :class:`InvalidJobError`."""
    data = json_object(body, "control message")
    model: type[Request] = CancelRequest if "cancel" in data else RescheduleRequest
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidJobError(f"invalid control message: {exc}") from None


@dataclass(frozen=True)
class Result:
    """What a cancel or reschedule did. ``status``: cancelled, rescheduled, refused, unknown."""

    job_id: str
    status: str
    detail: str
    due_at: datetime | None = None

    @property
    def applied(self) -> bool:
        """True when the job's record was changed."""
        return self.status in ("cancelled", "rescheduled")

    def as_dict(self) -> dict[str, Any]:
        """The JSON answer to a control message's ``reply_to``, and the CLI's output."""
        answer: dict[str, Any] = {"id": self.job_id, "status": self.status, "detail": self.detail}
        if self.due_at is not None:
            answer["due_at"] = self.due_at.isoformat()
        return answer


async def cancel(store: JobStore, outgoing: Outgoing, job_id: str) -> Result:
    """Stop a scheduled or retrying job from ever being sent, and announce it."""
    change = await store.cancel(job_id)
    if not change.applied:
        status = change.before["status"] if change.before else "gone"
        return Result(job_id, "refused", f"job is {status}: only a waiting job can be cancelled")
    await outgoing.event(*cancelled_event(job_id, change.before))
    if change.before is None:
        return Result(job_id, "cancelled", "not seen yet: it will not be sent if it arrives")
    return Result(job_id, "cancelled", f"was {change.before['status']}")


async def reschedule(
    store: JobStore, outgoing: Outgoing, job_id: str, due_at: datetime, now: datetime
) -> Result:
    """Move a scheduled job to ``due_at`` (earlier or later), and announce it."""
    change = await store.reschedule(job_id, due_at)
    before = change.before
    if not change.applied or before is None:
        if before is None:
            return Result(job_id, "unknown", "no such job")
        return Result(
            job_id, "refused", f"job is {before['status']}: only a scheduled job can be moved"
        )
    previous = before.get("due_at")
    body = before.get("body")
    if previous is not None and due_at >= previous:
        detail = "moved later: the copy in flight carries on to the new time"
    elif body is None:
        detail = "moved, but no body is stored to send earlier: it goes at the old time"
    else:
        # The copy in flight would come too late: send a new one for the new time.
        detail = "moved earlier: a new copy was published"
        copy = aio_pika.Message(
            bytes(body),
            headers={DUE_HEADER: to_epoch_ms(due_at)},
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=job_id,
        )
        await outgoing.delay(copy, due_at, SEND_KEY, now)
    await outgoing.event(*rescheduled_event(job_id, before, due_at))
    return Result(job_id, "rescheduled", detail, due_at)


async def execute(request: Request, store: JobStore, outgoing: Outgoing, now: datetime) -> Result:
    """Carry out one control request."""
    if isinstance(request, CancelRequest):
        return await cancel(store, outgoing, request.cancel)
    return await reschedule(store, outgoing, request.reschedule, request.send_at, now)
