"""Cancel and reschedule: the control-message contract and the two operations.

The job's MongoDB record is the truth; messages already in the ladder are never chased.
A copy of a cancelled job is dropped when it comes round. A job moved later is carried on
by its old copy, which finds the new due time in the record; a job moved earlier gets a new
copy, published here, and the old one finds the job sent when it arrives.

The CLI (``mailbus jobs cancel|reschedule``) and workers (for control messages published
with routing key ``control``) run the same functions. A control message is authorized like
a job: for a job of a registered domain it needs that domain's key (``domain_key``) or an
allowed broker user; a job not seen yet can only be cancelled by naming its ``domain``.
The CLI is the operator's and needs neither.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import aio_pika

from consumer.amqp.outgoing import Outgoing
from consumer.core.control import CancelRequest, Request, RescheduleRequest, Result
from consumer.core.events import cancelled_event, rescheduled_event
from consumer.core.headers import DUE_HEADER
from consumer.core.names import SEND_KEY
from consumer.core.schedule import to_epoch_ms
from consumer.service.authorization import Authority, Authorizer, seal
from consumer.store.jobs import JobStore
from consumer.vault import Vault


async def refusal(
    request: Request, store: JobStore, authorizer: Authorizer, user: str | None
) -> Result | None:
    """The answer to a control message that may not act on its job, or None when it may:
    the job's domain (from its record, else the request's ``domain``) must accept the
    request's ``domain_key`` or broker ``user``, as it would a job's.
    """
    job_id = request.job_id
    record = await store.get(job_id)
    recorded = record.get("domain") if record is not None else None
    named = request.domain if isinstance(request, CancelRequest) else None
    if record is not None and recorded is None:
        return None  # an operator's cancel record: nothing to act on, nobody's to guard
    if recorded is None and named is None:
        if isinstance(request, RescheduleRequest):
            # Answered here, not by the store: a record written meanwhile (another
            # domain's job arriving) is never touched by a request nobody authorized.
            return Result(job_id, "unknown", "no such job")
        detail = "name the job's domain to cancel a job not seen yet"
        return Result(job_id, "refused", detail, unauthorized=True)
    domain = recorded or named
    assert domain is not None
    if named is not None and named != domain:
        return Result(job_id, "refused", f"not authorized for job {job_id}", unauthorized=True)
    key = request.domain_key.get_secret_value() if request.domain_key is not None else None
    doc = await authorizer.domain(domain)
    why = await authorizer.credential_refusal(domain, doc, key, user)
    if why is None:
        return None
    return Result(job_id, "refused", why, unauthorized=True)


async def cancel(
    store: JobStore, outgoing: Outgoing, job_id: str, domain: str | None = None
) -> Result:
    """Stop a scheduled or retrying job (of ``domain``, when given) from ever being sent,
    and announce it.
    """
    change = await store.cancel(job_id, domain)
    if not change.applied:
        status = change.before["status"] if change.before else "gone"
        return Result(job_id, "refused", f"job is {status}: only a waiting job can be cancelled")
    await outgoing.event(*cancelled_event(job_id, change.before))
    if change.before is None:
        return Result(job_id, "cancelled", "not seen yet: it will not be sent if it arrives")
    return Result(job_id, "cancelled", f"was {change.before['status']}")


async def reschedule(
    store: JobStore,
    outgoing: Outgoing,
    job_id: str,
    due_at: datetime,
    now: datetime,
    *,
    vault: Vault | None,
    seal_days: float,
) -> Result:
    """Move a scheduled job to ``due_at`` (earlier or later), and announce it. A copy sent
    for the earlier time carries the job's authorization sealed with ``vault`` (its stored
    body has no key), valid ``seal_days`` past ``due_at``.
    """
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
        # The record was written once the job was authorized for its domain.
        domain = before.get("domain")
        headers = seal(
            {DUE_HEADER: to_epoch_ms(due_at)},
            Authority(domain=domain if isinstance(domain, str) else None),
            message_id=job_id,
            body=bytes(body),
            vault=vault,
            expires=due_at + timedelta(days=seal_days),
        )
        copy = aio_pika.Message(
            bytes(body),
            headers=headers,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=job_id,
        )
        await outgoing.delay(copy, due_at, SEND_KEY, now)
    await outgoing.event(*rescheduled_event(job_id, before, due_at))
    return Result(job_id, "rescheduled", detail, due_at)


async def execute(
    request: Request,
    store: JobStore,
    outgoing: Outgoing,
    now: datetime,
    *,
    vault: Vault | None,
    seal_days: float,
) -> Result:
    """Carry out one control request (authorized already, see :func:`refusal`)."""
    if isinstance(request, CancelRequest):
        return await cancel(store, outgoing, request.cancel, request.domain)
    return await reschedule(
        store,
        outgoing,
        request.reschedule,
        request.send_at,
        now,
        vault=vault,
        seal_days=seal_days,
    )
