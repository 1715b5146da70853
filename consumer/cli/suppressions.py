"""``mailbus suppress``: addresses mail is never sent to."""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta

from consumer.cli.output import table
from consumer.cli.parsing import Subparsers
from consumer.clock import utcnow
from consumer.core.suppression import Scope
from consumer.settings import Settings
from consumer.store.mongo import Mongo
from consumer.store.suppressions import scope_of


def _scope(args: argparse.Namespace) -> Scope:
    try:
        return Scope(args.domain, args.list)
    except ValueError as exc:
        raise SystemExit(f"mailbus suppress: {exc}") from None


async def _add(args: argparse.Namespace, settings: Settings) -> int:
    scope = _scope(args)
    expire_at = utcnow() + timedelta(days=args.days) if args.days is not None else None
    async with Mongo.connect(settings) as mongo:
        await mongo.suppressions.ensure_indexes()
        for address in args.address:
            await mongo.suppressions.add(address, args.reason, scope=scope, expire_at=expire_at)
    until = f" until {expire_at.isoformat(timespec='seconds')}" if expire_at else ""
    print(f"{len(args.address)} address(es) suppressed ({scope.describe()}){until}")
    return 0


async def _rm(args: argparse.Namespace, settings: Settings) -> int:
    scope = _scope(args)
    missing = []
    async with Mongo.connect(settings) as mongo:
        for address in args.address:
            if not await mongo.suppressions.remove(address, scope=scope):
                missing.append(address)
    for address in missing:
        print(
            f"mailbus suppress rm: {address!r} was not suppressed ({scope.describe()})",
            file=sys.stderr,
        )
    print(f"{len(args.address) - len(missing)} address(es) no longer suppressed")
    return 1 if missing else 0


async def _ls(args: argparse.Namespace, settings: Settings) -> int:
    async with Mongo.connect(settings) as mongo:
        docs = await mongo.suppressions.find(args.limit, domain=args.domain, address=args.address)
    rows = [("ADDRESS", "SCOPE", "SOURCE", "SINCE", "UNTIL", "REASON")]
    rows += [
        (
            str(d.get("address") or d["_id"]),
            scope_of(d).describe(),
            str(d.get("source", "-")),
            d["created_at"].isoformat(timespec="seconds"),
            d["expire_at"].isoformat(timespec="seconds") if d.get("expire_at") else "-",
            str(d.get("reason") or "-"),
        )
        for d in docs
    ]
    print(table(rows))
    return 0


def _scope_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--domain", help="for this sending domain only (default: every domain)")
    parser.add_argument(
        "--list", metavar="NAME", help="for this list of --domain only (as jobs name it)"
    )


def add_parser(verbs: Subparsers) -> None:
    """Register ``mailbus suppress`` and its actions on the top-level subparsers."""
    suppress = verbs.add_parser(
        "suppress",
        help="manage the suppression list",
        description="Mail is never sent to a suppressed address: it is left out of the "
        "recipients and recorded on the job (and in its mail.sent event); a job whose every "
        "recipient is suppressed is dead-lettered 'suppressed'. A suppression is global (an "
        "operator's entry without --domain), for one sending domain, or for one list of a "
        "domain; a job is held to the global entries, its domain's and its list's. "
        "Recipients a server refuses as unknown (5xx with enhanced status 5.1.1, 5.1.2, "
        "5.1.3, 5.1.6 or 5.1.10) are added for the job's domain automatically, for "
        "MAILBUS_BOUNCE_SUPPRESSION_DAYS (default 30; 0 turns it off). Addresses compare "
        "without regard to case.",
    )
    actions = suppress.add_subparsers(dest="suppress_verb", required=True, metavar="ACTION")

    add = actions.add_parser(
        "add", help="suppress addresses", description="Suppress addresses (until removed)."
    )
    add.add_argument("address", nargs="+", help="an email address")
    add.add_argument("--reason", default="added by an operator", help="why, for the listing")
    add.add_argument("--days", type=float, help="lift the suppression after this many days")
    _scope_arguments(add)
    add.set_defaults(handler=_add)

    rm = actions.add_parser(
        "rm",
        help="lift suppressions",
        description="Lift the suppression of addresses (exit 1 if one was not suppressed).",
    )
    rm.add_argument("address", nargs="+", help="an email address")
    _scope_arguments(rm)
    rm.set_defaults(handler=_rm)

    ls = actions.add_parser(
        "ls", help="list suppressed addresses", description="List suppressions, newest first."
    )
    ls.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    ls.add_argument("--domain", help="only this domain's suppressions (its lists' too)")
    ls.add_argument("--address", help="only this address's suppressions, in every scope")
    ls.set_defaults(handler=_ls)
