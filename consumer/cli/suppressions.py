"""``mailbus suppress``: addresses mail is never sent to."""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta

from consumer.cli.output import table
from consumer.cli.parsing import Subparsers
from consumer.clock import utcnow
from consumer.settings import Settings
from consumer.store.mongo import Mongo


async def _add(args: argparse.Namespace, settings: Settings) -> int:
    expire_at = utcnow() + timedelta(days=args.days) if args.days is not None else None
    async with Mongo.connect(settings) as mongo:
        await mongo.suppressions.ensure_indexes()
        for address in args.address:
            await mongo.suppressions.add(address, args.reason, expire_at)
    until = f" until {expire_at.isoformat(timespec='seconds')}" if expire_at else ""
    print(f"{len(args.address)} address(es) suppressed{until}")
    return 0


async def _rm(args: argparse.Namespace, settings: Settings) -> int:
    missing = []
    async with Mongo.connect(settings) as mongo:
        for address in args.address:
            if not await mongo.suppressions.remove(address):
                missing.append(address)
    for address in missing:
        print(f"mailbus suppress rm: {address!r} was not suppressed", file=sys.stderr)
    print(f"{len(args.address) - len(missing)} address(es) no longer suppressed")
    return 1 if missing else 0


async def _ls(args: argparse.Namespace, settings: Settings) -> int:
    async with Mongo.connect(settings) as mongo:
        docs = await mongo.suppressions.find(args.limit)
    rows = [("ADDRESS", "SOURCE", "SINCE", "UNTIL", "REASON")]
    rows += [
        (
            str(d["_id"]),
            str(d.get("source", "-")),
            d["created_at"].isoformat(timespec="seconds"),
            d["expire_at"].isoformat(timespec="seconds") if d.get("expire_at") else "-",
            str(d.get("reason") or "-"),
        )
        for d in docs
    ]
    print(table(rows))
    return 0


def add_parser(verbs: Subparsers) -> None:
    """Register ``mailbus suppress`` and its actions on the top-level subparsers."""
    suppress = verbs.add_parser(
        "suppress",
        help="manage the suppression list",
        description="Mail is never sent to a suppressed address: it is left out of the "
        "recipients and recorded on the job (and in its mail.sent event); a job whose every "
        "recipient is suppressed is dead-lettered 'suppressed'. Recipients a server refuses "
        "as unknown (5xx with enhanced status 5.1.1, 5.1.2, 5.1.3, 5.1.6 or 5.1.10) are "
        "added automatically for MAILBUS_BOUNCE_SUPPRESSION_DAYS (default 30; 0 turns it "
        "off). Addresses compare without regard to case.",
    )
    actions = suppress.add_subparsers(dest="suppress_verb", required=True, metavar="ACTION")

    add = actions.add_parser(
        "add", help="suppress addresses", description="Suppress addresses (until removed)."
    )
    add.add_argument("address", nargs="+", help="an email address")
    add.add_argument("--reason", default="added by an operator", help="why, for the listing")
    add.add_argument("--days", type=float, help="lift the suppression after this many days")
    add.set_defaults(handler=_add)

    rm = actions.add_parser(
        "rm",
        help="lift suppressions",
        description="Lift the suppression of addresses (exit 1 if one was not suppressed).",
    )
    rm.add_argument("address", nargs="+", help="an email address")
    rm.set_defaults(handler=_rm)

    ls = actions.add_parser(
        "ls", help="list suppressed addresses", description="List suppressions, newest first."
    )
    ls.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    ls.set_defaults(handler=_ls)
