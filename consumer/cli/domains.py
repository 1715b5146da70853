"""``mailbus domain``: which sending domains require a key or an allowed broker user."""

from __future__ import annotations

import argparse
import secrets
import sys
from datetime import datetime

from consumer.cli.dkim import add_dkim_parser
from consumer.cli.output import fail, pretty_json, table
from consumer.cli.parsing import Subparsers
from consumer.core.api_keys import (
    GENERATED_KEY_BYTES,
    MAX_API_KEYS,
    MAX_KEY_CHARS,
    api_key_problem,
    key_name_problem,
    next_key_name,
)
from consumer.core.returns import checked_bounce_domain, own_bounce_domain
from consumer.errors import ConfigurationError
from consumer.settings import Settings
from consumer.store.domains import api_key_names, describe, hash_key
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
    rows = [("DOMAIN", "KEY", "ALLOWED USERS", "SENDERS", "BOUNCE DOMAIN")]
    rows += [
        (
            str(d["_id"]),
            "set" if d.get("key_hash") else "-",
            ", ".join(d.get("allow_users", [])) or "-",
            ", ".join(d.get("senders") or [str(d["_id"])]),
            own_bounce_domain(d) or "-",
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


async def _sandbox(args: argparse.Namespace, settings: Settings) -> int:
    on = args.mode == "on"
    async with Mongo.connect(settings) as mongo:
        found = await mongo.domains.set_sandbox(args.domain, on)
    if not found:
        return fail("domain sandbox", f"{args.domain!r} is not registered (mailbus domain add)")
    domain = args.domain.lower()
    if on:
        print(f"domain {domain!r} in sandbox mode: its mail is sent to no real recipient")
    else:
        print(f"domain {domain!r} out of sandbox mode: its mail is delivered")
    return 0


async def _bounce_domain(args: argparse.Namespace, settings: Settings) -> int:
    if (args.bounce_domain is None) != args.clear:
        raise ConfigurationError("give a BOUNCE_DOMAIN or --clear")
    bounce = None if args.bounce_domain is None else checked_bounce_domain(args.bounce_domain)
    if bounce is not None and settings.secret_key is None:
        raise ConfigurationError(
            "MAILBUS_SECRET_KEY is needed for a bounce domain: the workers sign each mail's "
            "return address with it, and the bounce listener checks it (create one with "
            "`mailbus outbox new-key`)"
        )
    async with Mongo.connect(settings) as mongo:
        found = await mongo.domains.set_bounce_domain(args.domain, bounce)
    if not found:
        return fail(
            "domain bounce-domain", f"{args.domain!r} is not registered (mailbus domain add)"
        )
    domain = args.domain.lower()
    if bounce is None:
        print(f"domain {domain!r}: its return addresses are at MAILBUS_BOUNCE_DOMAIN's again")
    else:
        print(f"domain {domain!r}: its return addresses are at {bounce!r} (publish its MX and SPF)")
    return 0


def _read_api_key() -> str:
    """One key from standard input, read no further than a key can be long."""
    key = sys.stdin.readline(MAX_KEY_CHARS + 2).rstrip("\r\n")
    problem = api_key_problem(key)
    if problem is not None:
        raise ConfigurationError(f"--key-stdin: {problem}")
    return key


async def _api_key_add(args: argparse.Namespace, settings: Settings) -> int:
    if settings.secret_key is None:
        raise ConfigurationError(
            "MAILBUS_SECRET_KEY is needed for API keys: the REST gateway seals a request's "
            "authorization onto its job (create one with `mailbus outbox new-key`)"
        )
    if args.name is not None and (problem := key_name_problem(args.name)) is not None:
        raise ConfigurationError(f"--name: {problem}")
    key = _read_api_key() if args.key_stdin else secrets.token_urlsafe(GENERATED_KEY_BYTES)
    domain = args.domain.lower()
    async with Mongo.connect(settings) as mongo:
        doc = await mongo.domains.get(domain)
        name = args.name or next_key_name(api_key_names(doc or {}))
        added = (
            "unregistered"
            if doc is None
            else await mongo.domains.add_api_key(domain, name, hash_key(key), MAX_API_KEYS)
        )
    refused = {
        "unregistered": f"{domain!r} is not registered (mailbus domain add)",
        "exists": f"{domain!r} has an API key named {name!r}",
        "full": f"{domain!r} has {MAX_API_KEYS} API keys: remove one first",
    }.get(added)
    if refused is not None:
        return fail("domain api-key add", refused)
    said = f"API key {name!r} added to domain {domain!r}: only its hash is kept"
    if args.key_stdin:
        print(said)
    else:  # the key alone on standard output, for a script to take; shown this once
        print(f"{said}; the key is shown this once", file=sys.stderr)
        print(key)
    return 0


async def _api_key_ls(args: argparse.Namespace, settings: Settings) -> int:
    async with Mongo.connect(settings) as mongo:
        doc = await mongo.domains.get(args.domain)
    if doc is None:
        return fail("domain api-key ls", f"{args.domain!r} is not registered")
    rows = [("NAME", "ADDED")]
    for entry in doc.get("api_keys", []):
        added = entry.get("created_at")
        when = added.isoformat(timespec="seconds") if isinstance(added, datetime) else "-"
        rows.append((str(entry.get("name")), when))
    print(table(rows))
    return 0


async def _api_key_rm(args: argparse.Namespace, settings: Settings) -> int:
    async with Mongo.connect(settings) as mongo:
        found = await mongo.domains.remove_api_key(args.domain, args.name)
    if not found:
        return fail("domain api-key rm", f"{args.domain!r} has no API key named {args.name!r}")
    print(f"API key {args.name!r} of domain {args.domain.lower()!r} removed")
    return 0


def _add_api_key_parser(actions: Subparsers) -> None:
    api_key = actions.add_parser(
        "api-key",
        help="manage a domain's API keys for the REST gateway's X-API-KEY header",
        description="A REST request (mailbus gateway serve --rest) whose X-API-KEY header "
        "holds one of its domain's API keys needs no domain_key. Keys are stored as salted "
        "scrypt hashes under a name, and never printed again after `add`; they belong to "
        f"the domain's registration (removed with it, kept by --replace). Up to "
        f"{MAX_API_KEYS} a domain. The gateway and the workers need MAILBUS_SECRET_KEY.",
    )
    verbs = api_key.add_subparsers(dest="api_key_verb", required=True, metavar="ACTION")
    add = verbs.add_parser(
        "add",
        help="add an API key to a registered domain",
        description="Add an API key: a new one is generated and printed (the key alone on "
        "standard output, once), or --key-stdin reads one (an old CodeIgniter key, say) "
        "from standard input and prints nothing of it.",
    )
    add.add_argument("domain", help="the registered sending domain")
    add.add_argument(
        "--name",
        help="what to call the key, to remove it by (default: the next number: 1, 2, ...)",
    )
    add.add_argument(
        "--key-stdin",
        action="store_true",
        help="read the key from standard input (16 to 256 visible ASCII characters)",
    )
    add.set_defaults(handler=_api_key_add)
    ls = verbs.add_parser(
        "ls",
        help="list a domain's API keys by name (never a key or its hash)",
        description="List a domain's API keys: their names and when they were added.",
    )
    ls.add_argument("domain", help="the registered sending domain")
    ls.set_defaults(handler=_api_key_ls)
    rm = verbs.add_parser(
        "rm",
        help="remove one of a domain's API keys",
        description="Remove an API key: requests with it are refused within 5 seconds.",
    )
    rm.add_argument("domain", help="the registered sending domain")
    rm.add_argument("name", help="the key's name, as `api-key ls` shows it")
    rm.set_defaults(handler=_api_key_rm)


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
        (
            "show",
            "print one registered domain as JSON (the key only as set or not, API keys by name)",
            _show,
        ),
        ("rm", "unregister a domain (any job may then send for it)", _rm),
    ):
        action = actions.add_parser(verb, help=text, description=text[0].upper() + text[1:] + ".")
        action.add_argument("domain", help="the sending domain")
        action.set_defaults(handler=handler)
    sandbox = actions.add_parser(
        "sandbox",
        help="turn a registered domain's sandbox mode on or off (staging, CI)",
        description="In sandbox mode a domain's jobs are authorized, rendered, recorded and "
        'announced (mail.sent, marked "sandbox": true) as in production, but not delivered; '
        "with MAILBUS_SANDBOX_OUTBOX set, they are delivered to that catch-all outbox only, "
        "with their envelope recipients as they are. No provider's rate limit is spent. A "
        'single job can ask for the same with "sandbox": true. `add --replace` keeps the '
        "mode; workers see a change within 5 seconds.",
    )
    sandbox.add_argument("domain", help="the registered sending domain")
    sandbox.add_argument("mode", choices=("on", "off"), help="on: sandbox its mail; off: deliver")
    sandbox.set_defaults(handler=_sandbox)
    bounce = actions.add_parser(
        "bounce-domain",
        help="give a registered domain a bounce domain of its own, or --clear it",
        description="The domain's mail goes with return addresses (MAIL FROM) at its own "
        "bounce domain instead of MAILBUS_BOUNCE_DOMAIN, which need not be set: a subdomain "
        "of the domain (bounces.example.com) keeps SPF aligned with its From for DMARC. "
        "Publish the bounce domain's MX (the host of `mailbus gateway serve --bounces`) and "
        "SPF first. Each return address is signed for the one domain it is at, so the bounce "
        "listener takes mail for every domain's bounce domain without a list of them, and "
        "refuses one domain's address moved to another's. Mail sent before a change keeps "
        "its addresses, which stay valid. Needs MAILBUS_SECRET_KEY; `add --replace` keeps "
        "it; workers see a change within 5 seconds.",
    )
    bounce.add_argument("domain", help="the registered sending domain")
    bounce.add_argument(
        "bounce_domain", nargs="?", metavar="BOUNCE_DOMAIN", help="e.g. bounces.example.com"
    )
    bounce.add_argument(
        "--clear", action="store_true", help="no bounce domain of its own: MAILBUS_BOUNCE_DOMAIN's"
    )
    bounce.set_defaults(handler=_bounce_domain)
    _add_api_key_parser(actions)
    add_dkim_parser(actions)
