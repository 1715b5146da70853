"""Control messages: cancel and reschedule requests as their contract says, and what
the worker answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from consumer.core.message import DomainName, SendTime, json_object
from consumer.core.refusals import InvalidJobError

JobId = Field(min_length=1, max_length=200)


class CancelRequest(BaseModel):
    """``{"cancel": ID}``: never send this job. ``domain`` names the domain of a job not
    seen yet (its cancel record then belongs to that domain).
    """

    model_config = ConfigDict(extra="forbid")
    cancel: str = JobId
    domain: DomainName | None = None
    domain_key: SecretStr | None = None

    @property
    def job_id(self) -> str:
        """The job the request is about."""
        return self.cancel


class RescheduleRequest(BaseModel):
    """``{"reschedule": ID, "send_at": RFC3339}``: send this scheduled job at another time."""

    model_config = ConfigDict(extra="forbid")
    reschedule: str = JobId
    send_at: SendTime
    domain_key: SecretStr | None = None

    @property
    def job_id(self) -> str:
        """The job the request is about."""
        return self.reschedule


Request = CancelRequest | RescheduleRequest


def parse_request(body: bytes, *, max_bytes: int | None = None) -> Request:
    """Decode a control message; anything else is an :class:`InvalidJobError` (one over
    ``max_bytes`` a :class:`~consumer.core.refusals.JobTooLargeError`, before it is decoded).
    """
    data = json_object(body, "control message", max_bytes=max_bytes)
    model: type[Request] = CancelRequest if "cancel" in data else RescheduleRequest
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidJobError(f"invalid control message: {exc}") from None


Status = Literal["cancelled", "rescheduled", "refused", "unknown"]


@dataclass(frozen=True)
class Result:
    """What a cancel or reschedule did. ``unauthorized``: refused because the requester
    may not act for the job's domain (the request is dead-lettered too).
    """

    job_id: str
    status: Status
    detail: str
    due_at: datetime | None = None
    unauthorized: bool = False

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
