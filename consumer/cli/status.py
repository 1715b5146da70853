"""``mailbus status``: one screen on queues, the ladder, today's mail, tokens and errors."""

from __future__ import annotations

import argparse
from typing import Any

from consumer.cli.output import pretty_json, table
from consumer.cli.parsing import Subparsers
from consumer.clock import utcnow
from consumer.service.status import gather
from consumer.settings import Settings


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


Rows = list[tuple[str, ...]]


def _queues(status: dict[str, Any]) -> str:
    rows: Rows = [("QUEUE", "READY", "UNACKED", "CONSUMERS")]
    for queue in status["queues"]:
        if queue.get("missing"):
            rows.append((queue["name"], "-", "-", "missing: run `mailbus topology declare`"))
            continue
        figures = (queue["ready"], queue["unacked"], queue["consumers"])
        rows.append((queue["name"], *(_dash(f) for f in figures)))
    waiting = status["ladder"]
    levels = ", ".join(f"level {n}: {c}" for n, c in waiting["levels"].items())
    ladder = f"Delay ladder: {waiting['waiting']} waiting" + (f" ({levels})" if levels else "")
    return f"{table(rows)}\n\n{ladder}"


def _today(status: dict[str, Any]) -> str:
    today = status["today"]
    head = (
        f"Since {today['since']}: {today['sent']} sent, {today['failed']} failed, "
        f"{today['dead']} dead"
    )
    back = today["feedback"]
    head += (
        f"; came back: {back['hard']} hard bounces, {back['soft']} soft, "
        f"{back['complaints']} complaints"
    )
    rows: Rows = [("BY", "NAME", "SENT", "FAILED", "DEAD")]
    for kind in ("domain", "outbox", "provider"):
        for name, counts in today[f"by_{kind}"].items():
            rows.append((kind, name, *(str(counts[o]) for o in ("sent", "failed", "dead"))))
    return f"{head}\n{table(rows)}" if len(rows) > 1 else head


def _tokens(status: dict[str, Any]) -> str:
    rows: Rows = [("PROVIDER", "LIMIT", "TOKENS LEFT")]
    for name, tokens in status["providers"].items():
        slowed = " (slowed: throttling)" if tokens["slowdown"] > 1 else ""
        for limit in tokens["limits"]:
            left = f"{limit['tokens']} of {tokens['burst']}{slowed}"
            rows.append((name, limit["limit"], left))
    return table(rows) if len(rows) > 1 else "No providers: outboxes send without limits."


def _errors(status: dict[str, Any]) -> str:
    rows: Rows = [("WHEN", "JOB", "STATUS", "REASON", "DOMAIN", "OUTBOX", "ERROR")]
    for error in status["last_errors"]:
        when = error["at"].isoformat(timespec="seconds") if error["at"] else "-"
        fields = ("status", "reason", "domain", "outbox")
        rows.append(
            (when, error["id"], *(_dash(error[f]) for f in fields), _dash(error["error"])[:120])
        )
    return f"Last errors:\n{table(rows)}" if len(rows) > 1 else "No recent errors."


def render(status: dict[str, Any]) -> str:
    """The status as text for a terminal."""
    source = "management API" if status["queue_source"] == "management" else "passive declares"
    head = f"mailbus status at {status['at']} (queues from the {source})"
    sections = (head, _queues(status), _today(status), _tokens(status), _errors(status))
    return "\n\n".join(sections)


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    status = await gather(settings, utcnow())
    print(pretty_json(status) if args.json else render(status))
    return 0


def add_parser(verbs: Subparsers) -> None:
    """Register ``mailbus status`` on the top-level subparsers."""
    status = verbs.add_parser(
        "status",
        help="queues, delay ladder, today's counts, tokens left and the last errors",
        description="One screen on the running system: depth and consumers of the send, "
        "control and dead-letter queues, and of the webhooks queues where `mailbus webhook "
        "serve` declared them (from the RabbitMQ management API when "
        "MAILBUS_MANAGEMENT_URL is set, which also counts unacknowledged messages; else from "
        "passive declares), mails waiting in the delay ladder by level, jobs sent, failed "
        "and dead since midnight UTC per domain, outbox and provider (from the job records), "
        "tokens left per provider limit, and the last errors.",
    )
    status.add_argument("--json", action="store_true", help="print JSON, for scripts")
    status.set_defaults(handler=_status)
