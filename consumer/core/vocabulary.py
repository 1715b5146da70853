"""The words outcomes, records and answers speak: job statuses, dead-letter reasons, why a job
waits. Each is a ``Literal``, so that mypy checks every value and every ``match`` on them.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

# A job record's status: waiting (``scheduled``, ``queued``), held (``sending``) or final.
JobStatus = Literal["scheduled", "queued", "sending", "sent", "failed", "dead", "cancelled"]
FinalStatus = Literal["sent", "failed", "dead", "cancelled"]
STATUSES: Final[tuple[JobStatus, ...]] = get_args(JobStatus)
WAITING: Final[tuple[JobStatus, ...]] = ("queued", "scheduled")


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

# What an SMTP reply means for the job (``consumer.core.retry.reply_verdict``): try again
# later, never, or later and slower (the provider is throttling: its bucket is slowed).
ReplyVerdict = Literal["transient", "permanent", "throttle"]
REPLY_VERDICTS: Final[tuple[ReplyVerdict, ...]] = get_args(ReplyVerdict)

# What a ``reply_to`` caller ("send now and tell me") is told of its job.
ReplyStatus = Literal["sent", "dead", "deferred", "skipped"]
# What the older systems' clients are told: the REST server, and the TCP daemon.
RestStatus = Literal["success", "failed"]
# The formats the REST gateway answers in (the old server knew more: see rest_formats).
RestFormat = Literal["json", "xml"]
REST_FORMATS: Final[tuple[RestFormat, ...]] = get_args(RestFormat)
DaemonStatus = Literal["success", "error"]

# Who put an address on the suppression list: an operator, a server's refusal or a later
# bounce (``bounce``), the recipient's complaint or one-click unsubscribe.
SuppressionSource = Literal["manual", "bounce", "complaint", "unsubscribe"]

# A bounce that came back after the hand-over: ``hard`` (the address failed for good:
# Action failed, a 5.x.x status) suppresses it; ``soft`` (delayed, 4.x.x) is only counted.
BounceKind = Literal["hard", "soft"]
BOUNCE_KINDS: Final[tuple[BounceKind, ...]] = get_args(BounceKind)
# What came back, as a job's record keeps it: a bounce of either kind, or a complaint.
FeedbackKind = Literal["hard", "soft", "complaint"]
# What the bounces and complaints that come back are counted as (status, metrics, digest).
FeedbackTally = Literal["hard", "soft", "complaints"]
FEEDBACK_TALLIES: Final[tuple[FeedbackTally, ...]] = get_args(FeedbackTally)


def tally_of(kind: FeedbackKind) -> FeedbackTally:
    """The count a bounce or complaint of ``kind`` adds to."""
    match kind:
        case "hard" | "soft":
            return kind
        case "complaint":
            return "complaints"


# What one webhook delivery attempt ended in (``mailbus webhook log``): ``delivered`` (2xx),
# ``failed`` (tried again later), ``dead`` (past MAILBUS_WEBHOOK_MAX_AGE), ``refused`` (a
# URL that can never be delivered to), ``gone`` (410: the endpoint was turned off),
# ``removed`` (the endpoint was removed or turned off before a retry).
WebhookStatus = Literal["delivered", "failed", "dead", "refused", "gone", "removed"]
# Why a webhook delivery is given up (its ``x-mailbus-reason`` in ``mailbus.webhooks.dead``):
# retried past MAILBUS_WEBHOOK_MAX_AGE, a URL that can never be delivered to, an endpoint
# that answered 410 Gone, or a delivery that is no event (or a copy with a broken seal).
WebhookDeadReason = Literal["expired", "refused", "gone", "invalid"]
# What a webhook delivery came to, as ``mailbus_webhook_deliveries_total`` counts it: an
# attempt answered 2xx, an attempt that failed and is tried again, or a delivery given up
# (its ``WebhookDeadReason`` beside it).
WebhookOutcome = Literal["delivered", "failed", "given_up"]
