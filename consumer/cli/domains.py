"""``mailbus domain``: which sending domains require a key or an allowed broker user."""

from __future__ import annotations

import argparse
import sys

from consumer.cli.output import fail, pretty_json, table
from consumer.cli.parsing import Subparsers
from consumer.errors import ConfigurationError
from consumer.settings import Settings
from consumer.store.domains import describe, hash_key
from consumer.store.mongo import Mongo


async def _add(args: argparse.Namespace, settings: Settings) -> int:
    key = sys.stdin.readline().rstrip("\r\n") if args.key_stdin else None
    if args.key_stdin and not key:
        raise ConfigurationError("--key-stdin read an empty key")
    if key is None and not args.allow_user:
        raise ConfigurationError("give --key-stdin, --allow-user USER, or both")
    if args.allow_user and settings.secret_key is None:
        raise ConfigurationError(
            "MAILBUS_SECRET_KEY is needed for --allow-user: workers sign the broker user "
            "onto the copies a retry or a wait makes (create one with `mailbus outbox new-key`)"
        )
    key_hash = hash_key(key) if key is not None else None
    async with Mongo.connect(settings) as mongo:
        stored = await mongo.domains.put(
            args.domain,
            key_hash,
            args.allow_user or [],
            replace=args.replace,
            senders=args.sender or [],
        )
    if not stored:
        return fail("domain add", f"{args.domain!r} exists (use --replace)")
    print(f"domain {args.domain.lower()!r} registered: only authorized jobs send for it")
    return 0


async def _ls(args: argparse.Namespace, settings: Settings) -> int:
    async with Mongo.connect(settings) as mongo:
        docs = await mongo.domains.find()
    rows = [("DOMAIN", "KEY", "ALLOWED USERS", "SENDERS")]
    rows += [
        (
            str(d["_id"]),
            "set" if d.get("key_hash") else "-",
            ", ".join(d.get("allow_users", [])) or "-",
            ", ".join(d.get("senders") or [str(d["_id"])]),
        )
        for d in docs
    ]
    print(table(rows))
    return 0


async def _show(args: argparse.Namespace, settings: Settings) -> int:
    async with Mongo.connect(settings) as mongo:
        doc = await mongo.domains.get(args.domain)
    if doc is None:
        return fail("domain show", f"{args.domain!r} is not registered")
    print(pretty_json(describe(doc)))
    return 0


async def _rm(args: argparse.Namespace, settings: Settings) -> int:
    async with Mongo.connect(settings) as mongo:
        found = await mongo.domains.remove(args.domain)
    if not found:
        return fail("domain rm", f"{args.domain!r} is not registered")
    print(f"domain {args.domain.lower()!r} unregistered: any job may send for it again")
    return 0


def add_parser(verbs: Subparsers) -> None:
    """Register ``mailbus domain`` and its actions on the top-level subparsers."""
    domain = verbs.add_parser(
        "domain",
        help="manage who may send for each domain",
        description="A domain that is not registered is open to every job (unless "
        "MAILBUS_OPEN_DOMAINS=false), with a From address that is not under a registered "
        "domain. A registered domain accepts a job only if its domain_key matches the stored "
        "hash, or if it was published by an allowed RabbitMQ user (the AMQP user_id property, "
        "which RabbitMQ checks against the login), and only with a From under one of its "
        "sender domains (default: the domain itself and its subdomains); the same holds for "
        "cancel and reschedule requests for its jobs. Any other job is dead-lettered "
        "'unauthorized' without sending. Workers read these settings again within 5 seconds "
        "of a change.",
    )
    actions = domain.add_subparsers(dest="domain_verb", required=True, metavar="ACTION")

    add = actions.add_parser(
        "add",
        help="register a domain with a key and/or allowed broker users",
        description="Register a domain. The key is read from standard input and only a "
        "salted scrypt hash of it is stored.",
    )
    add.add_argument("domain", help="the sending domain, e.g. example.com")
    add.add_argument(
        "--key-stdin", action="store_true", help="read the domain key from standard input"
    )
    add.add_argument(
        "--allow-user",
        action="append",
        metavar="USER",
        help="a RabbitMQ user that may send for the domain without a key (repeatable; "
        "needs MAILBUS_SECRET_KEY)",
    )
    add.add_argument(
        "--sender",
        action="append",
        metavar="DOMAIN",
        help="a domain the From address may be under (repeatable; default: the domain "
        "itself; subdomains are included)",
    )
    add.add_argument("--replace", action="store_true", help="overwrite an existing registration")
    add.set_defaults(handler=_add)

    ls = actions.add_parser("ls", help="list registered domains", description="List domains.")
    ls.set_defaults(handler=_ls)
    for verb, text, handler in (
        ("show", "print one registered domain as JSON (the key only as set or not)", _show),
        ("rm", "unregister a domain (any job may then send for it)", _rm),
    ):
        action = actions.add_parser(verb, help=text, description=text[0].upper() + text[1:] + ".")
        action.add_argument("domain", help="the sending domain")
        action.set_defaults(handler=handler)
