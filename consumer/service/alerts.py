"""Admin alerts: every dead letter a worker publishes is noted in MongoDB, and a digest
mail lists them to ``MAILBUS_ADMIN_EMAIL``.

A digest goes out ``MAILBUS_ADMIN_DIGEST_SECONDS`` after the oldest dead letter not yet
reported, and lists every one noted until then, so a storm makes one mail per interval.
It is an ordinary job published to the send queue, with an id derived from its cutoff:
workers that reach the same cutoff at once publish the same job, which is sent once. A
digest's own dead letter is never noted, so an alert never alerts about itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from consumer.clock import utcnow
from consumer.core.message import json_body, parse_job
from consumer.core.refusals import InvalidJobError
from consumer.core.vocabulary import FeedbackTally
from consumer.errors import ConfigurationError
from consumer.logging import get_logger
from consumer.store.alerts import AlertStore
from consumer.store.documents import Document
from consumer.store.feedback import FeedbackCounts

log = get_logger(__name__)
DIGEST_PREFIX = "mailbus-admin-digest-"
LISTED = 200  # dead letters a digest lists one by one; it counts the rest
IDLE_CHECK = 10.0  # seconds between looks for new dead letters when none are waiting


def is_digest(job_id: str | None) -> bool:
    """Whether ``job_id`` is a digest's (its dead letter is never noted)."""
    return job_id is not None and job_id.startswith(DIGEST_PREFIX)


def alert_document(
    job_id: str | None,
    reason: str,
    error: str,
    domain: str | None,
    now: datetime,
    keep: timedelta,
) -> Document:
    """What is noted of one dead letter (never its content or secrets)."""
    return {
        "at": now,
        "job_id": job_id,
        "reason": reason,
        "error": error[:500],
        "domain": domain,
        "digest": None,
        "expire_at": now + keep,
    }


def digest_job(
    alerts: Sequence[Document],
    total: int,
    admin: str,
    sender: str,
    cutoff: datetime,
    feedback: Mapping[FeedbackTally, int] | None = None,
) -> dict[str, Any]:
    """The v1 job of a digest listing ``alerts`` (the first of ``total``) up to ``cutoff``,
    with the bounces and complaints of the day before it (``feedback``), when known.
    """
    stamp = cutoff.strftime("%Y%m%dT%H%M%S.%fZ")
    first = alerts[0]["at"] if alerts else cutoff
    lines = [
        f"{total} dead letter(s) between {first:%Y-%m-%d %H:%M:%S} and "
        f"{cutoff:%Y-%m-%d %H:%M:%S} UTC.",
        "",
    ]
    for alert in alerts:
        lines.append(
            f"{alert['at']:%Y-%m-%d %H:%M:%S}  {alert['reason']}  "
            f"{alert.get('job_id') or '(no id)'}  {alert.get('domain') or '-'}  "
            f"{alert.get('error') or ''}"
        )
    if total > len(alerts):
        lines.append(f"... and {total - len(alerts)} more.")
    lines += ["", "`mailbus dead ls` lists them; `mailbus dead replay` sends them again."]
    if feedback is not None:
        lines += [
            "",
            f"Came back in the 24 hours before: {feedback.get('hard', 0)} hard bounce(s), "
            f"{feedback.get('soft', 0)} soft, {feedback.get('complaints', 0)} complaint(s).",
        ]
    return {
        "id": DIGEST_PREFIX + stamp,
        "domain": sender.rpartition("@")[2],
        "from": {"email": sender, "name": "mailbus"},
        "to": [admin],
        "subject": f"mailbus: {total} dead letter(s)",
        "text": "\n".join(lines),
        "tags": ["mailbus-admin-digest"],
    }


def check_addresses(admin: str, sender: str) -> None:
    """Refuse, at start, addresses a digest could never be sent with."""
    try:
        parse_job(json_body(digest_job([], 0, admin, sender, utcnow())), None)
    except InvalidJobError as exc:
        raise ConfigurationError(f"MAILBUS_ADMIN_EMAIL or MAILBUS_ADMIN_FROM: {exc}") from None


Publish = Callable[[dict[str, Any]], Awaitable[None]]


class Digests:
    """What every worker looks at now and then when ``MAILBUS_ADMIN_EMAIL`` is set."""

    def __init__(
        self,
        alerts: AlertStore,
        admin: str,
        sender: str,
        interval: float,
        publish: Publish,
        feedback: FeedbackCounts | None = None,
    ) -> None:
        """``feedback``: where bounces and complaints are counted, for the digest to say."""
        self.alerts = alerts
        self.feedback = feedback
        self.admin = admin
        self.sender = sender
        self.interval = timedelta(seconds=interval)
        self.publish = publish

    async def tick(self, now: datetime) -> float:
        """Send the digest that is due, if any; seconds until the next look."""
        oldest = await self.alerts.oldest_waiting()
        if oldest is None:
            return min(IDLE_CHECK, self.interval.total_seconds())
        cutoff: datetime = oldest["at"] + self.interval
        if now < cutoff:
            return (cutoff - now).total_seconds()
        listed, total = await self.alerts.waiting_until(cutoff, LISTED)
        came_back = None
        if self.feedback is not None:
            came_back = await self.feedback.since(cutoff - timedelta(days=1), cutoff)
        job = digest_job(listed, total, self.admin, self.sender, cutoff, came_back)
        # Published before the dead letters are marked: a crash in between repeats the
        # same job id, which is sent once.
        await self.publish(job)
        await self.alerts.reported(cutoff, job["id"])
        log.info("alerts.digest_published", digest=job["id"], dead_letters=total)
        return 0.0
