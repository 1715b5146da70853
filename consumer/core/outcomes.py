"""What handling one delivery of a job can end in: the outcome types the worker settles,
and the vocabulary they speak (job statuses, dead-letter reasons, why a job waits),
each a ``Literal`` so that mypy checks every value and every ``match`` on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Final, Literal, get_args

from consumer.errors import MailbusError

if TYPE_CHECKING:  # the job contract raises these outcomes' exceptions: no import cycle
    from consumer.core.leases import Release
    from consumer.core.message import Job

# A job record's status: waiting (``scheduled``, ``queued``), held (``sending``) or final.
JobStatus = Literal["scheduled", "queued", "sending", "sent", "failed", "dead", "cancelled"]
FinalStatus = Literal["sent", "failed", "dead", "cancelled"]
STATUSES: Final[tuple[JobStatus, ...]] = get_args(JobStatus)
WAITING: Final[tuple[JobStatus, ...]] = ("queued", "scheduled")
FINAL: Final[tuple[FinalStatus, ...]] = get_args(FinalStatus)


def final_status(status: JobStatus) -> FinalStatus | None:
    """``status`` if it is final (nothing more will happen to the job), else None."""
    match status:
        case "sent" | "failed" | "dead" | "cancelled":
            return status
        case "scheduled" | "queued" | "sending":
            return None


# Why a job is dead-lettered: its ``x-mailbus-reason``, and the ``reason`` of its event.
DeadReason = Literal[
    "invalid",
    "expired",
    "permanent",
    "attempts_exhausted",
    "no_outbox",
    "unauthorized",
    "conflict",
    "attachment",
    "template",
    "too_large",
    "suppressed",
    "delivery_limit",
]
DEAD_REASONS: Final[tuple[DeadReason, ...]] = get_args(DeadReason)
# The reasons that mean the SMTP side gave up (``mail.failed``); every other reason is a
# job mailbus refused itself (``mail.dead``).
FAILED_REASONS: Final[frozenset[DeadReason]] = frozenset({"permanent", "attempts_exhausted"})

# Why a job comes round again later: ``scheduled`` (first seen before its time),
# ``waiting`` (seen again early), ``retry`` (a transient failure), ``rate_limited`` (no
# provider token until then), ``leased`` (another worker is on it) or ``store`` (MongoDB
# did not answer).
LaterWhy = Literal["scheduled", "waiting", "retry", "rate_limited", "leased", "store"]


@dataclass(frozen=True)
class SendResult:
    """The server's acceptance, and the recipients it refused while accepting others."""

    code: int
    message: str
    refused: dict[str, tuple[int, str]]


@dataclass(frozen=True)
class Context:
    """What is known of the job an outcome belongs to."""

    job_id: str | None
    job: Job | None = None
    attempts: int = 0
    outbox: str | None = None
    # The stored template the mail was rendered from, as (name, version).
    template: tuple[str, int] | None = None
    provider: str | None = None
    # The job may send for its domain: its copies carry that, sealed, instead of its key.
    authorized: bool = False


@dataclass(frozen=True)
class Sent:
    """The SMTP server accepted the mail; its record says ``sent``. ``suppressed``
    recipients were left out because they are on the suppression list.
    """

    ctx: Context
    result: SendResult
    suppressed: tuple[str, ...] = ()
    seconds: float = 0.0  # the SMTP hand-over


@dataclass(frozen=True)
class Skip:
    """Nothing to do: the job's record is final already (sent, failed, dead or cancelled)."""

    ctx: Context
    status: FinalStatus

    @property
    def why(self) -> str:
        """What the log and a ``reply_to`` caller are told."""
        return f"already {self.status}"


@dataclass(frozen=True)
class Dead:
    """The job can never be sent: it goes to the dead-letter queue with ``reason``."""

    ctx: Context
    reason: DeadReason
    error: str
    code: int | None = None


@dataclass(frozen=True)
class Later:
    """Not now: the job comes round again at ``due_at``, for the reason ``why``."""

    ctx: Context
    due_at: datetime
    why: LaterWhy
    failure: Failure | None = None
    # ``store`` only: the lease this delivery let go of, for its copy to take over.
    release: Release | None = None


@dataclass(frozen=True)
class Crashed:
    """Processing raised unexpectedly; the broker redelivers it (bounded by its delivery limit)."""

    ctx: Context
    error: str


Outcome = Sent | Skip | Dead | Later | Crashed


class DeadLetterError(MailbusError):
    """A job that can never be sent as it is; ``reason`` becomes ``x-mailbus-reason``."""

    reason: DeadReason = "permanent"


class InvalidJobError(DeadLetterError, ValueError):
    """The message is not a valid v1 job (bad JSON, schema violation, header injection)."""

    reason: DeadReason = "invalid"


class JobTooLargeError(InvalidJobError):
    """The job's body is bigger than ``MAILBUS_MAX_JOB_BYTES``; refused before decoding."""

    reason: DeadReason = "too_large"


class AttachmentError(DeadLetterError):
    """An attachment that can never be read: a refused path, scheme or address, or too big."""

    reason: DeadReason = "attachment"


class TemplateError(DeadLetterError):
    """A stored template is missing, fails to render, or uses an undefined variable."""

    reason: DeadReason = "template"


class MessageTooLargeError(DeadLetterError):
    """The built message is bigger than ``MAILBUS_MAX_MESSAGE_BYTES``."""

    reason: DeadReason = "too_large"


@dataclass(frozen=True)
class Failure:
    """A failed send attempt as the retry policy sees it."""

    transient: bool
    code: int | None
    message: str
    # Per-recipient replies when the server refused every recipient.
    refusals: Mapping[str, tuple[int, str]] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for records and dead letters: ``451 try later`` or the error text."""
        return f"{self.code} {self.message}" if self.code is not None else self.message
