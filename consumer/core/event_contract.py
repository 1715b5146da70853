"""The contract of the ``mailbus.events`` bodies (pydantic) and its JSON Schema.

:mod:`consumer.core.events` builds the bodies; these models say what subscribers may rely on,
and ``consumer/schemas/events-v1.json`` is generated from them (``make schema``). Fields
are only ever added, never renamed or removed, within v1.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SmtpReply(_Strict):
    """The SMTP server's reply (``message`` absent when only the code is known)."""

    code: int
    message: str | None = None


class Refusal(_Strict):
    """One recipient's refusal."""

    code: int
    message: str


class TemplateUsed(_Strict):
    """The stored template and version a mail was rendered from."""

    name: str
    version: int


class _Job(_Strict):
    """What every event about a job says: its id, and what the job carried for you."""

    id: str = Field(description="the job id (idempotency key)")
    domain: str | None = Field(None, description="absent when the job never parsed")
    tags: list[str] = Field([], description="the job's tags, echoed")
    metadata: dict[str, Any] = Field({}, description="the job's metadata, echoed")
    sandbox: bool = Field(
        False,
        description="present (true) for a sandboxed job: its domain's flag or its own; "
        "mail.sent then means not delivered, or delivered to the sandbox outbox only",
    )


class _Attempted(_Job):
    attempts: int = Field(description="send attempts so far (rate-limit waits not counted)")
    outbox: str | None = Field(None, description="the outbox of the attempt, when one was chosen")
    template: TemplateUsed | None = None


class MailSent(_Attempted):
    """The server accepted the mail (for some recipients at least)."""

    event: Literal["mail.sent"]
    smtp: SmtpReply
    refused: dict[str, Refusal] = Field(description="recipients refused for good, by address")
    suppressed: list[str] = Field(description="recipients left out: on the suppression list")


class MailFailed(_Attempted):
    """``mail.failed``: the SMTP side refused for good (reasons ``permanent``,
    ``attempts_exhausted``); ``mail.dead``: mailbus refused the job itself (every other
    dead-letter reason). Either way the job is in the dead-letter queue.
    """

    event: Literal["mail.failed", "mail.dead"]
    reason: str = Field(description="the dead-letter reason, as in x-mailbus-reason")
    error: str
    smtp: SmtpReply | None = None


class MailDeferred(_Attempted):
    """The job waits: a transient failure (``retry``) or no token (``rate_limited``)."""

    event: Literal["mail.deferred"]
    reason: Literal["retry", "rate_limited"]
    due_at: datetime = Field(description="when it is tried again")
    error: str | None = None
    smtp: SmtpReply | None = None


class MailScheduled(_Attempted):
    """First seen before its time, or moved (``rescheduled``)."""

    event: Literal["mail.scheduled"]
    due_at: datetime
    rescheduled: bool = False
    previous_due_at: datetime | None = None


class MailCancelled(_Job):
    """The job will never be sent; ``previous_status`` is what its record said before."""

    event: Literal["mail.cancelled"]
    previous_status: str | None = None
    due_at: datetime | None = None


class MailBounced(_Job):
    """A bounce came back to the mail's return address (MAILBUS_BOUNCE_DOMAIN) after the
    server took it: ``hard`` (failed for good; the recipient is then suppressed for the
    job's domain) or ``soft`` (delayed).
    """

    event: Literal["mail.bounced"]
    recipient: str
    kind: Literal["hard", "soft"]
    status: str | None = Field(None, description="the enhanced status code, e.g. 5.1.1")
    diagnostic: str | None = Field(
        None, description="the remote server's words, one line of at most 300 characters"
    )


class MailComplained(_Job):
    """A recipient complained (an ARF feedback report came back to the return address);
    the recipient is suppressed for the job's domain for good.
    """

    event: Literal["mail.complained"]
    recipient: str
    feedback_type: str = Field(description="the report's Feedback-Type: abuse, fraud, other...")


class MailUnsubscribed(_Strict):
    """A recipient used a one-click unsubscribe link: mail of ``domain`` for ``list`` no
    longer goes to them. Published on each use of the link (a second click says it again).
    """

    event: Literal["mail.unsubscribed"]
    domain: str
    list: str = Field(description="the list (or topic) the recipient left")
    recipient: str = Field(description="the address, lower case, as it is suppressed")
    id: str | None = Field(None, description="the id of the job whose mail carried the link")
    at: datetime = Field(description="when the gateway took the request")


EventBody = Annotated[
    MailSent
    | MailFailed
    | MailDeferred
    | MailScheduled
    | MailCancelled
    | MailBounced
    | MailComplained
    | MailUnsubscribed,
    Field(discriminator="event"),
]
EVENTS: TypeAdapter[EventBody] = TypeAdapter(EventBody)


def events_json_schema() -> dict[str, Any]:
    """The JSON Schema of every event body, as shipped in ``consumer/schemas/events-v1.json``."""
    schema = EVENTS.json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://mailbus.invalid/schemas/events-v1.json"
    schema["title"] = "mailbus event"
    return schema
