"""What ``mailbus status`` shows, shaped from the figures RabbitMQ and MongoDB give:
queues, the delay ladder, today's outcomes and the last errors.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, time
from typing import Any

from consumer.core import ladder
from consumer.core.names import Names
from consumer.core.vocabulary import FEEDBACK_TALLIES, FeedbackTally


@dataclass(frozen=True)
class QueueFigures:
    """One queue: messages ready, delivered but unacknowledged (None when unknown), consumers."""

    ready: int
    unacked: int | None
    consumers: int


Figures = dict[str, QueueFigures | None]  # None: the queue does not exist


OUTCOMES = ("sent", "failed", "dead")


LAST_ERRORS = 10


def start_of_day(now: datetime) -> datetime:
    """Midnight (UTC) of ``now``'s day: "today" for the counts."""
    return datetime.combine(now.date(), time(0), tzinfo=now.tzinfo)


def queues_of(names: Names, figures: Figures) -> list[dict[str, Any]]:
    """The send, control and dead-letter queues, each with its figures (None: missing),
    then the webhooks queue and its dead letters when they exist (``mailbus webhook
    serve`` declares them; an install without webhooks has none).
    """
    rows = []
    queues = (names.send_queue, names.send_now_queue, names.due_queue, names.control_queue)
    for name in (*queues, names.dead):
        found = figures.get(name)
        rows.append({"name": name, **(vars(found) if found else {"missing": True})})
    for name in (names.webhooks_queue, names.webhooks_dead):
        found = figures.get(name)
        if found is not None:
            rows.append({"name": name, **vars(found)})
    return rows


def ladder_of(names: Names, figures: Figures) -> dict[str, Any]:
    """Mails waiting in the delay ladder, in all and per level holding any."""
    levels = {}
    for level in range(ladder.LEVELS - 1, -1, -1):
        found = figures.get(names.delay(level))
        count = found.ready + (found.unacked or 0) if found else 0
        if count:
            levels[str(level)] = count
    return {"waiting": sum(levels.values()), "levels": levels}


def today_of(
    rows: Iterable[Mapping[str, Any]],
    providers: Mapping[str, str],
    since: datetime,
    feedback: Mapping[FeedbackTally, int],
) -> dict[str, Any]:
    """Fold counts by (status, domain, outbox) into totals and per domain, outbox and
    provider (``providers`` maps outbox names to theirs); ``feedback`` is what came back
    (bounces hard and soft, complaints).
    """
    totals = dict.fromkeys(OUTCOMES, 0)
    by: dict[str, dict[str, dict[str, int]]] = {
        kind: defaultdict(lambda: dict.fromkeys(OUTCOMES, 0))
        for kind in ("domain", "outbox", "provider")
    }
    for row in rows:
        status, count = row["status"], int(row["count"])
        totals[status] += count
        outbox = row.get("outbox")
        keys = {
            "domain": row.get("domain"),
            "outbox": outbox,
            "provider": providers.get(outbox or ""),
        }
        for kind, key in keys.items():
            if key:
                by[kind][key][status] += count
    return {
        "since": since.isoformat(),
        **totals,
        **{f"by_{kind}": dict(sorted(counts.items())) for kind, counts in by.items()},
        "feedback": {tally: feedback.get(tally, 0) for tally in FEEDBACK_TALLIES},
    }


def error_of(doc: Mapping[str, Any]) -> dict[str, Any]:
    """One line of "last errors"."""
    return {
        "id": doc["_id"],
        "at": doc.get("updated_at"),
        "status": doc.get("status"),
        "reason": doc.get("reason"),
        "domain": doc.get("domain"),
        "outbox": doc.get("outbox"),
        "attempts": doc.get("attempts", 0),
        "error": doc.get("last_error"),
    }
