"""``mailbus dead``: list, show, replay and purge the dead-letter queue."""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import aio_pika
from aio_pika.abc import AbstractChannel

from consumer.amqp.dead_letters import (
    DeadLetter,
    browse,
    is_webhook_letter,
    parse_age,
    read,
    replay_copy,
    shown,
)
from consumer.cli.output import fail, pretty_json, table, terminal_safe
from consumer.cli.parsing import Subparsers
from consumer.clock import utcnow
from consumer.core.names import SEND_KEY, Names
from consumer.settings import Settings
from consumer.store.mongo import Mongo

# Dead letters looked at by one command, oldest first; all are held until it ends.
SCAN = 10_000


@asynccontextmanager
async def dead_letter_channel(settings: Settings) -> AsyncIterator[tuple[AbstractChannel, Names]]:
    """A confirming channel for reading and replaying dead letters, and the queue names."""
    async with await aio_pika.connect(settings.amqp_url.get_secret_value()) as connection:
        yield await connection.channel(publisher_confirms=True), Names(settings.prefix)


def _when(letter: DeadLetter) -> str:
    return letter.dead_at.isoformat(timespec="seconds") if letter.dead_at else "-"


async def _ls(args: argparse.Namespace, settings: Settings) -> int:
    async with (
        dead_letter_channel(settings) as (channel, names),
        browse(channel, names.dead, SCAN) as held,
    ):
        letters = [read(m) for m in held]
    chosen = [d for d in letters if args.reason in (None, d.reason)][: args.limit]
    rows = [("DEAD AT", "REASON", "JOB", "DOMAIN", "ERROR")]
    rows += [
        (_when(d), d.reason, d.job_id or "-", d.domain or "-", (d.error or "-")[:120])
        for d in chosen
    ]
    print(table(rows))
    if len(chosen) < len(letters):
        print(f"({len(chosen)} of {len(letters)} shown)", file=sys.stderr)
    return 0


async def _show(args: argparse.Namespace, settings: Settings) -> int:
    async with (
        dead_letter_channel(settings) as (channel, names),
        browse(channel, names.dead, SCAN) as held,
    ):
        found = next(((m, d) for m in held if (d := read(m)).job_id == args.id), None)
        if found is None:
            return fail("dead show", f"no dead letter for job {args.id!r}")
        message, letter = found
        print(pretty_json({**shown(message), "dead_letter": vars(letter)}))
    return 0


async def _replay(args: argparse.Namespace, settings: Settings) -> int:
    if not (args.id or args.reason or args.all):
        return fail("dead replay", "give job ids, --reason or --all", code=2)
    wanted = set(args.id)
    replayed = 0
    async with (
        dead_letter_channel(settings) as (channel, names),
        Mongo.connect(settings) as mongo,
        browse(channel, names.dead, SCAN) as held,
    ):
        exchange = await channel.get_exchange(names.exchange, ensure=False)
        for message in held:
            letter = read(message)
            if not (args.all or letter.job_id in wanted or letter.reason == args.reason):
                continue
            wanted.discard(letter.job_id or "")
            if is_webhook_letter(message):
                # Never sent as a job: `mailbus webhook replay` puts these back.
                shown_id = terminal_safe(str(letter.job_id))
                print(f"{shown_id}: a webhook delivery, not replayed (left in the queue)")
                continue
            if letter.job_id is not None:
                change = await mongo.jobs.reopen(letter.job_id)
                status = change.before.get("status") if change.before else None
                if not change.applied and status is not None:
                    # A sent (or cancelled, or live) job is never sent again by a replay.
                    shown_id = terminal_safe(letter.job_id)
                    print(f"{shown_id}: {status}, not replayed (left in the queue)")
                    continue
            await exchange.publish(replay_copy(message), routing_key=SEND_KEY, mandatory=True)
            await message.ack()
            replayed += 1
            print(f"{terminal_safe(str(letter.job_id))}: replayed ({letter.reason})")
    for job_id in sorted(wanted):
        print(f"mailbus dead replay: no dead letter for job {job_id!r}", file=sys.stderr)
    print(f"{replayed} replayed")
    return 1 if wanted else 0


async def _purge(args: argparse.Namespace, settings: Settings) -> int:
    if args.older_than is None and not args.all:
        return fail("dead purge", "give --older-than AGE or --all", code=2)
    cutoff = utcnow() - (args.older_than or timedelta(0))
    purged = 0
    async with (
        dead_letter_channel(settings) as (channel, names),
        browse(channel, names.dead, SCAN) as held,
    ):
        for message in held:
            letter = read(message)
            if args.reason not in (None, letter.reason):
                continue
            old = letter.dead_at is not None and letter.dead_at <= cutoff
            if args.all or old:
                await message.ack()
                purged += 1
    print(f"{purged} dead letter(s) purged")
    return 0


def _age(value: str) -> timedelta:
    try:
        return parse_age(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(verbs: Subparsers) -> None:
    """Register ``mailbus dead`` and its actions on the top-level subparsers."""
    dead = verbs.add_parser(
        "dead",
        help="list, show, replay and purge dead letters",
        description=f"Dead letters wait in the queue mailbus.dead (with MAILBUS_PREFIX) with "
        "their reason. These commands look at the oldest "
        f"{SCAN} and hand back every one they do not replay or purge.",
    )
    actions = dead.add_subparsers(dest="dead_verb", required=True, metavar="ACTION")

    ls = actions.add_parser(
        "ls",
        help="list dead letters: when, reason, job id, domain, error",
        description="List dead letters, oldest first.",
    )
    ls.add_argument("--reason", help="only this reason, e.g. permanent or attachment")
    ls.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    ls.set_defaults(handler=_ls)

    show = actions.add_parser(
        "show",
        help="print one dead letter whole as JSON (secrets masked)",
        description="Print a job's dead letter: properties, headers and body, with the "
        "domain key masked.",
    )
    show.add_argument("id", help="the job id")
    show.set_defaults(handler=_show)

    replay = actions.add_parser(
        "replay",
        help="send dead letters again, once the cause is fixed",
        description="Publish dead letters back to the send queue with their attempts reset "
        "and no delay, and remove them from the dead-letter queue. A job whose record says "
        "it was sent (or cancelled, or is live) is not replayed: a replay never sends a mail "
        "twice.",
    )
    replay.add_argument("id", nargs="*", help="job ids")
    replay.add_argument("--reason", help="every dead letter with this reason")
    replay.add_argument("--all", action="store_true", help="every dead letter")
    replay.set_defaults(handler=_replay)

    purge = actions.add_parser(
        "purge",
        help="delete dead letters for good",
        description="Delete dead letters older than an age (by when they died), or all.",
    )
    purge.add_argument("--older-than", type=_age, metavar="AGE", help="e.g. 7d, 12h, 30min, 90s")
    purge.add_argument("--reason", help="only this reason")
    purge.add_argument("--all", action="store_true", help="every dead letter, whatever its age")
    purge.set_defaults(handler=_purge)
