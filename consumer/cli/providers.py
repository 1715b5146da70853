"""``mailbus provider``: the rate limits every outbox of a provider shares."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from consumer.cli.output import fail, pretty_json, table
from consumer.cli.parsing import Subparsers
from consumer.core.ratelimit import parse_limit
from consumer.core.replies import MAX_RULES, MAX_TEXT, ReplyRule, parse_rules
from consumer.settings import Settings
from consumer.store.mongo import Mongo
from consumer.store.providers import limits_of


async def _set(args: argparse.Namespace, settings: Settings) -> int:
    limits = [parse_limit(text) for text in args.limit]
    rules = parse_rules(args.reply)
    async with Mongo.connect(settings) as mongo:
        created = await mongo.providers.put(args.name, limits, args.burst, rules)
    shown = ", ".join(str(lim) for lim in limits)
    done = "created" if created else "replaced"
    print(f"provider {args.name!r} {done}: {shown}, burst {args.burst}{_said(rules)}")
    return 0


async def _replies(args: argparse.Namespace, settings: Settings) -> int:
    rules = parse_rules(args.reply)
    async with Mongo.connect(settings) as mongo:
        found = await mongo.providers.set_reply_rules(args.name, rules)
    if not found:
        return fail("provider replies", f"no provider {args.name!r}")
    print(f"provider {args.name!r}: {len(rules)} reply rules{_said(rules)}")
    return 0


def _said(rules: Sequence[ReplyRule]) -> str:
    return "".join(f"\n  {rule}" for rule in rules)


async def _ls(args: argparse.Namespace, settings: Settings) -> int:
    async with Mongo.connect(settings) as mongo:
        docs = await mongo.providers.find()
    rows = [("NAME", "BURST", "LIMITS", "REPLY RULES")]
    rows += [
        (
            str(d["_id"]),
            str(d.get("burst", 1)),
            ", ".join(str(x) for x in limits_of(d)),
            str(len(d.get("replies", ()))),
        )
        for d in docs
    ]
    print(table(rows))
    return 0


async def _show(args: argparse.Namespace, settings: Settings) -> int:
    async with Mongo.connect(settings) as mongo:
        doc = await mongo.providers.get(args.name)
    if doc is None:
        return fail("provider show", f"no provider {args.name!r}")
    print(pretty_json(doc))
    return 0


async def _rm(args: argparse.Namespace, settings: Settings) -> int:
    async with Mongo.connect(settings) as mongo:
        found = await mongo.providers.remove(args.name)
    if not found:
        return fail("provider rm", f"no provider {args.name!r}")
    print(f"provider {args.name!r} removed: its outboxes now send without a limit")
    return 0


def _burst(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("the burst is at least 1")
    return value


def _add_reply(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reply",
        action="append",
        default=[],
        metavar="'VERDICT: [CODE] [X.Y.Z] [TEXT]'",
        help="what a matching SMTP reply means: transient (retry), permanent (fail) or "
        "throttle (retry, and slow the provider), e.g. 'transient: 550 5.7.1 rate limited' "
        "(a code or an enhanced code at least; TEXT is matched case-insensitively, at most "
        f"{MAX_TEXT} characters; the first rule that matches decides; at most {MAX_RULES}; "
        "repeatable)",
    )


def add_parser(verbs: Subparsers) -> None:
    """Register ``mailbus provider`` and its actions on the top-level subparsers."""
    provider = verbs.add_parser(
        "provider",
        help="manage the rate limits of each provider",
        description="A provider (gmail, ses, a hosting company) caps how fast its accounts "
        "may send. Outboxes name their provider; every worker takes a token from the "
        "provider's buckets in MongoDB before sending through one of its outboxes. When "
        "no outbox of a domain has a token, the job waits in the delay ladder exactly "
        "until the earliest one, without using an attempt (event mail.deferred, reason "
        "rate_limited). An outbox whose provider is not defined here sends without a limit. "
        "A provider's reply rules say what its SMTP replies mean where their codes do not; "
        "a throttling reply (421, 4.7.x, or a rule's throttle) slows it to half its rate "
        "for MAILBUS_THROTTLE_SECONDS.",
    )
    actions = provider.add_subparsers(dest="provider_verb", required=True, metavar="ACTION")

    put = actions.add_parser(
        "set",
        help="create or replace a provider's limits",
        description="Create or replace a provider's limits; its buckets start full. Each "
        "--limit N/PERIOD allows at most N + BURST - 1 sends in any window of PERIOD, and N "
        "per PERIOD over a long run; every limit must allow a send. With --burst 1 (the "
        "default) a limit is a strict sliding-window cap: never more than N in any PERIOD.",
    )
    put.add_argument("name", help="the provider name outboxes refer to, e.g. gmail")
    put.add_argument(
        "--limit",
        action="append",
        required=True,
        metavar="N/PERIOD",
        help="e.g. 500/day, 20/minute, 5/second, 99/hour, 10/30s (repeatable)",
    )
    put.add_argument(
        "--burst",
        type=_burst,
        default=1,
        help="sends allowed back to back after a quiet spell, the buckets' capacity (default 1)",
    )
    _add_reply(put)
    put.set_defaults(handler=_set)

    replies = actions.add_parser(
        "replies",
        help="replace a provider's reply rules, its buckets untouched",
        description="Replace a provider's reply rules (none given: remove them all); its "
        "buckets and any slowdown are untouched. The first rule that matches a reply "
        "decides; replies no rule matches are judged by their codes.",
    )
    replies.add_argument("name", help="the provider name")
    _add_reply(replies)
    replies.set_defaults(handler=_replies)

    ls = actions.add_parser("ls", help="list providers", description="List providers.")
    ls.set_defaults(handler=_ls)
    for verb, text, handler in (
        ("show", "print one provider as JSON, with its buckets' state", _show),
        ("rm", "delete a provider (its outboxes then send without a limit)", _rm),
    ):
        action = actions.add_parser(verb, help=text, description=text[0].upper() + text[1:] + ".")
        action.add_argument("name", help="the provider name")
        action.set_defaults(handler=handler)
