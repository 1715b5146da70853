"""Events on the ``mailbus.events`` exchange and RPC replies, derived from outcomes."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, assert_never

from consumer.core.outcomes import Context, Crashed, Dead, Later, Outcome, Sent, Skip
from consumer.core.reports import Bounce, Complaint
from consumer.core.unsubscribe import Unsubscribe
from consumer.core.vocabulary import FAILED_REASONS, ReplyStatus

Event = tuple[str, dict[str, Any]]


def event_for(outcome: Outcome) -> Event | None:
    """The routing key and JSON body of the event an outcome publishes, if any.

    A scheduled mail announces ``mail.scheduled`` once, when first seen. Bodies never carry
    secrets or message content.
    """
    ctx = outcome.ctx
    body: dict[str, Any] = {"id": ctx.job_id, "attempts": ctx.attempts}
    if ctx.job is not None:
        body.update(domain=ctx.job.domain, tags=ctx.job.tags, metadata=ctx.job.metadata)
    if ctx.outbox is not None:
        body["outbox"] = ctx.outbox
    if ctx.template is not None:
        body["template"] = {"name": ctx.template[0], "version": ctx.template[1]}
    if ctx.sandbox:  # absent otherwise: production events read as they always have
        body["sandbox"] = True
    match outcome:
        case Sent(result=result, suppressed=suppressed):
            key = "mail.sent"
            body["smtp"] = {"code": result.code, "message": result.message}
            body["refused"] = {r: {"code": c, "message": m} for r, (c, m) in result.refused.items()}
            body["suppressed"] = list(suppressed)
        case Dead(reason=reason, error=error, code=code):
            key = "mail.failed" if reason in FAILED_REASONS else "mail.dead"
            body.update(reason=reason, error=error, smtp={"code": code} if code else None)
        case Later(why=why, due_at=due_at, failure=failure):
            match why:
                case "scheduled":
                    key = "mail.scheduled"
                    body["due_at"] = due_at.isoformat()
                case "retry":
                    key = "mail.deferred"
                    body.update(
                        due_at=due_at.isoformat(),
                        reason="retry",
                        error=failure.describe() if failure else None,
                        smtp={"code": failure.code} if failure and failure.code else None,
                    )
                case "rate_limited":
                    key = "mail.deferred"
                    body.update(due_at=due_at.isoformat(), reason="rate_limited")
                case "waiting" | "leased" | "store":
                    return None
                case _:
                    assert_never(why)
        case Skip() | Crashed():
            return None
        case _:
            assert_never(outcome)
    body["event"] = key
    return key, body


def cancelled_event(job_id: str, record: Mapping[str, Any] | None) -> Event:
    """``mail.cancelled``: the job will never be sent (``record`` is the one before)."""
    body: dict[str, Any] = {"id": job_id, "event": "mail.cancelled"}
    if record is not None:
        body.update(
            domain=record.get("domain"),
            tags=record.get("tags", []),
            metadata=record.get("metadata", {}),
            previous_status=record.get("status"),
            due_at=_iso(record.get("due_at")),
        )
        if record.get("sandbox"):
            body["sandbox"] = True
    return "mail.cancelled", body


def rescheduled_event(job_id: str, record: Mapping[str, Any], due_at: datetime) -> Event:
    """``mail.scheduled`` again, for a job moved to ``due_at`` (``record`` is the one before)."""
    body: dict[str, Any] = {
        "id": job_id,
        "event": "mail.scheduled",
        "domain": record.get("domain"),
        "tags": record.get("tags", []),
        "metadata": record.get("metadata", {}),
        "attempts": record.get("attempts", 0),
        "due_at": due_at.isoformat(),
        "previous_due_at": _iso(record.get("due_at")),
        "rescheduled": True,
    }
    if record.get("sandbox"):
        body["sandbox"] = True
    return "mail.scheduled", body


def _about(job_id: str, record: Mapping[str, Any], event: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": job_id,
        "event": event,
        "domain": record.get("domain"),
        "tags": record.get("tags", []),
        "metadata": record.get("metadata", {}),
    }
    if record.get("sandbox"):
        body["sandbox"] = True
    return body


def bounced_event(job_id: str, record: Mapping[str, Any], bounce: Bounce) -> Event:
    """``mail.bounced``: a bounce came back for one recipient of the job (``record``)."""
    body = _about(job_id, record, "mail.bounced")
    body.update(
        recipient=bounce.recipient,
        kind=bounce.kind,
        status=bounce.status,
        diagnostic=bounce.diagnostic,
    )
    return "mail.bounced", body


def complained_event(
    job_id: str, record: Mapping[str, Any], complaint: Complaint, recipient: str
) -> Event:
    """``mail.complained``: ``recipient`` of the job (``record``) complained."""
    body = _about(job_id, record, "mail.complained")
    body.update(recipient=recipient, feedback_type=complaint.feedback_type)
    return "mail.complained", body


def unsubscribed_event(request: Unsubscribe, at: datetime) -> Event:
    """``mail.unsubscribed``: ``request``'s recipient left its list, at ``at``."""
    body = {
        "event": "mail.unsubscribed",
        "domain": request.domain,
        "list": request.list_name,
        "recipient": request.recipient.lower(),
        "id": request.job_id,
        "at": at.isoformat(),
    }
    return "mail.unsubscribed", body


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def reply_for(outcome: Outcome) -> dict[str, Any] | None:
    """The answer to a ``reply_to`` caller ("send now and tell me"), for final outcomes."""
    ctx = outcome.ctx
    match outcome:
        case Sent(result=result, suppressed=suppressed):
            return _answer(
                ctx,
                "sent",
                smtp={"code": result.code, "message": result.message},
                refused=sorted(result.refused),
                suppressed=list(suppressed),
            )
        case Dead(reason=reason, error=error, code=code):
            smtp = {"code": code} if code else None
            return _answer(ctx, "dead", reason=reason, error=error, smtp=smtp)
        case Later(why="retry", due_at=due_at, failure=failure):
            said = failure.describe() if failure else None
            unreachable = {"unreachable": True} if failure and failure.unreachable else {}
            return _answer(ctx, "deferred", due_at=due_at.isoformat(), error=said, **unreachable)
        case Skip(why=why):
            return _answer(ctx, "skipped", reason=why)
        case Later() | Crashed():
            return None
        case _:
            assert_never(outcome)


def _answer(ctx: Context, status: ReplyStatus, **fields: Any) -> dict[str, Any]:
    sandbox = {"sandbox": True} if ctx.sandbox else {}
    return {"id": ctx.job_id, "status": status, **fields, **sandbox}
