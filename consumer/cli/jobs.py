"""``mailbus jobs``: list, show, cancel and reschedule jobs from their MongoDB records."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timedelta
from typing import get_args

import aio_pika
from pydantic import AwareDatetime, TypeAdapter, ValidationError

from consumer.amqp.outgoing import Outgoing
from consumer.cli.output import fail, pretty_json, table
from consumer.cli.parsing import Subparsers
from consumer.clock import utcnow
from consumer.core.names import Names
from consumer.core.vocabulary import STATUSES
from consumer.service import control
from consumer.settings import Settings
from consumer.store.jobs import MAX_PAGE, JobFilter, JobRecord, TimeField
from consumer.store.mongo import Mongo
from consumer.vault import Vault

_WHEN: TypeAdapter[datetime] = TypeAdapter(AwareDatetime)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z" if value else "-"


def _table(records: list[JobRecord]) -> str:
    rows = [("ID", "STATUS", "DUE (UTC)", "DOMAIN", "RCPTS", "SUBJECT")]
    rows += [
        (
            str(r["_id"]),
            str(r.get("status", "")),
            _when(r.get("due_at")),
            str(r.get("domain", "-")),
            str(r.get("recipients", "-")),
            str(r.get("subject", "")),
        )
        for r in records
    ]
    return table(rows)


def _filter(args: argparse.Namespace) -> JobFilter:
    """The listing's filter; raises ValueError naming a time that is not RFC 3339."""
    times: list[datetime | None] = []
    for flag, value in (("--since", args.since), ("--until", args.until)):
        try:
            times.append(_WHEN.validate_python(value) if value is not None else None)
        except ValidationError:
            raise ValueError(
                f"{flag} {value!r} is not an RFC 3339 time with a timezone "
                "(for example 2030-01-01T09:00:00+01:00)"
            ) from None
    since, until = times
    return JobFilter(
        recipient=args.to,
        sender=args.sender,
        tag=args.tag,
        domain=args.domain,
        subject=args.subject,
        outbox=args.outbox,
        status=args.status,
        since=since,
        until=until,
        time=args.time,
    )


async def _ls(args: argparse.Namespace, settings: Settings) -> int:
    try:
        where = _filter(args)
    except ValueError as exc:
        return fail("jobs ls", str(exc), code=2)
    async with Mongo.connect(settings) as mongo:
        try:
            records = await mongo.jobs.find(where, args.limit, args.after)
        except LookupError as exc:
            return fail("jobs ls", f"{exc}: it may have expired; list again without --after")
    print(pretty_json(records) if args.json else _table(records))
    if len(records) == args.limit and not args.json:
        print(f"next page: --after {records[-1]['_id']}", file=sys.stderr)
    return 0


async def _show(args: argparse.Namespace, settings: Settings) -> int:
    async with Mongo.connect(settings) as mongo:
        record = await mongo.jobs.get(args.id)
    if record is None:
        return fail("jobs show", f"no job {args.id!r}")
    record.pop("body", None)
    print(pretty_json(record))
    return 0


async def _change(args: argparse.Namespace, settings: Settings) -> int:
    """Cancel or reschedule, as a worker does for control messages."""
    due: datetime | None = None
    if args.jobs_verb == "reschedule":
        try:
            due = _WHEN.validate_python(args.at) if args.at else utcnow() + args.after
        except ValidationError:
            return fail(
                "jobs reschedule",
                f"--at {args.at!r} is not an RFC 3339 time with a timezone "
                "(for example 2030-01-01T09:00:00+01:00)",
                code=2,
            )
    async with (
        Mongo.connect(settings) as mongo,
        await aio_pika.connect(settings.amqp_url.get_secret_value()) as connection,
    ):
        channel = await connection.channel(publisher_confirms=True)
        vault = Vault.optional(settings)
        outgoing = await Outgoing.open(channel, Names(settings.prefix), vault=vault)
        if due is None:
            result = await control.cancel(mongo.jobs, outgoing, args.id)
        else:
            result = await control.reschedule(
                mongo.jobs,
                outgoing,
                args.id,
                due,
                utcnow(),
                vault=vault,
                seal_days=settings.seal_days,
            )
    print(pretty_json(result.as_dict()))
    return 0 if result.applied else 1


def _page_size(value: str) -> int:
    size = int(value)
    if not 1 <= size <= MAX_PAGE:
        raise argparse.ArgumentTypeError(f"--limit must be 1 to {MAX_PAGE}")
    return size


def _seconds(value: str) -> timedelta:
    return timedelta(seconds=float(value))


def add_parser(verbs: Subparsers) -> None:
    """Register ``mailbus jobs`` and its actions on the top-level subparsers."""
    jobs = verbs.add_parser(
        "jobs",
        help="list, show, cancel and reschedule jobs",
        description="Job records live in MongoDB (MAILBUS_MONGO_URL); they are the truth about "
        "every job: a cancelled job is never sent, whatever copy of it is still in the broker.",
    )
    actions = jobs.add_subparsers(dest="jobs_verb", required=True, metavar="ACTION")

    ls = actions.add_parser(
        "ls",
        help="find jobs by recipient, sender, tag, subject, domain, outbox, status or time",
        description="List job records (id, status, due time, domain, recipients, subject), "
        "newest first, those matching every filter given. Addresses and domains compare in "
        "lower case. Pages: with --after, the listing goes on after the last job of the "
        "previous page (printed on stderr when the page is full); jobs that arrive "
        "meanwhile never shift a page. A recipient, sender, tag or domain is found through "
        "an index; subject, outbox, status and time only narrow what that (or a time range, "
        "or a status) found, so a listing by subject or outbox alone reads every record "
        "(see the operator guide). Jobs recorded before this version are found by status "
        "and time only.",
    )
    ls.add_argument("--to", metavar="ADDRESS", help="only jobs sent (or to be sent) to ADDRESS")
    ls.add_argument("--from", dest="sender", metavar="ADDRESS", help="only jobs from ADDRESS")
    ls.add_argument("--tag", help="only jobs with this tag (exact)")
    ls.add_argument(
        "--subject", metavar="TEXT", help="only jobs whose subject starts with TEXT (any case)"
    )
    ls.add_argument("--domain", help="only jobs of this sending domain")
    ls.add_argument("--outbox", help="only jobs last tried through this outbox")
    ls.add_argument("--status", choices=STATUSES, help="only jobs with this status")
    ls.add_argument("--since", metavar="RFC3339", help="only jobs created (or --time) since then")
    ls.add_argument("--until", metavar="RFC3339", help="only jobs created (or --time) until then")
    ls.add_argument(
        "--time",
        choices=get_args(TimeField),
        default="created",
        help="which time --since and --until bound: when the job was first seen (default) "
        "or last changed",
    )
    ls.add_argument(
        "--limit",
        type=_page_size,
        default=50,
        help=f"at most this many, 1 to {MAX_PAGE} (default 50)",
    )
    ls.add_argument("--after", metavar="ID", help="the next page: jobs listed after job ID")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(handler=_ls)

    show = actions.add_parser(
        "show",
        help="print one job's record with its history, as JSON",
        description="Print a job's record: status, due time, attempts, last SMTP reply or "
        "error, refused recipients and the last 20 history entries, each attempt's with the "
        "SMTP server's reply (code and text, up to 500 characters) when it gave one. Exit 1 "
        "if unknown.",
    )
    show.add_argument("id", help="the job id")
    show.set_defaults(handler=_show)

    cancel = actions.add_parser(
        "cancel",
        help="stop a scheduled or retrying job from ever being sent",
        description="Cancel a job that waits (scheduled, or retrying after a failure) and "
        "publish mail.cancelled. A job not seen yet is recorded as cancelled, so it is not "
        "sent if it arrives. A job being sent or already done cannot be cancelled (exit 1).",
    )
    cancel.add_argument("id", help="the job id")
    cancel.set_defaults(handler=_change)

    move = actions.add_parser(
        "reschedule",
        help="move a scheduled job to another time",
        description="Move a scheduled (or retrying) job, earlier or later, and publish "
        "mail.scheduled. Exit 1 if the job is not waiting.",
    )
    move.add_argument("id", help="the job id")
    when = move.add_mutually_exclusive_group(required=True)
    when.add_argument("--at", metavar="RFC3339", help="the new time, with a timezone")
    when.add_argument(
        "--in", dest="after", type=_seconds, metavar="SECONDS", help="the new time, from now"
    )
    move.set_defaults(handler=_change)
