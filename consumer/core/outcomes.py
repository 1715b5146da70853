"""What handling one delivery of a job can end in: the outcome types the worker settles."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from consumer.core.leases import Release
from consumer.core.message import Job
from consumer.core.retry import Failure


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
    """Nothing to do: the job was already sent, failed or cancelled."""

    ctx: Context
    why: str


@dataclass(frozen=True)
class Dead:
    """The job can never be sent: it goes to the dead-letter queue with ``reason``."""

    ctx: Context
    reason: str
    error: str
    code: int | None = None


@dataclass(frozen=True)
class Later:
    """Not now: the job comes round again at ``due_at``.

    ``why``: ``scheduled`` (first seen before its time), ``waiting`` (seen again early),
    ``retry`` (a transient failure), ``rate_limited`` (no provider token until ``due_at``),
    ``leased`` (another worker is on it) or ``store`` (MongoDB did not answer).
    """

    ctx: Context
    due_at: datetime
    why: str
    failure: Failure | None = None
    # ``store`` only: the lease this delivery let go of, for its copy to take over.
    release: Release | None = None


@dataclass(frozen=True)
class Crashed:
    """Processing raised unexpectedly; the broker redelivers it (bounded by its delivery limit)."""

    ctx: Context
    error: str


Outcome = Sent | Skip | Dead | Later | Crashed
