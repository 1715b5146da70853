"""What handling one delivery of a job can end in: the outcome types the worker settles,
in the words of :mod:`consumer.core.vocabulary`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from consumer.core.leases import Release
from consumer.core.message import Job
from consumer.core.vocabulary import DeadReason, FinalStatus, LaterWhy


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
    # Sandbox mode (the job's flag or its domain's): not delivered, or only to the catch-all.
    sandbox: bool = False
    # The bounce domain its domain's registration names: its return address is there, not
    # at MAILBUS_BOUNCE_DOMAIN.
    bounce_domain: str | None = None


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
    """Processing raised unexpectedly, or met a record no claim leaves behind; the broker
    redelivers it (bounded by its delivery limit).
    """

    ctx: Context
    error: str


Outcome = Sent | Skip | Dead | Later | Crashed


@dataclass(frozen=True)
class Failure:
    """A failed send attempt as the retry policy sees it."""

    transient: bool
    code: int | None
    message: str
    # Per-recipient replies when the server refused every recipient.
    refusals: Mapping[str, tuple[int, str]] = field(default_factory=dict)
    # The server could not be reached at all (nothing was said over SMTP).
    unreachable: bool = False
    # The server said it is throttling (421, 4.7.x, or the provider's rule): slow down.
    throttle: bool = False

    def describe(self) -> str:
        """One line for records and dead letters: ``451 try later`` or the error text."""
        return f"{self.code} {self.message}" if self.code is not None else self.message
