"""``mailbus webhook``: a domain's signed HTTP webhooks, their delivery log, and the
service that delivers them.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from consumer.cli.output import fail, table
from consumer.cli.parsing import Subparsers
from consumer.core.webhooks import (
    ANY_EVENT,
    check_events,
    check_url,
    known_events,
    new_secret,
    secret_bytes,
)
from consumer.mail.fetch import shown_url
from consumer.service.webhooks import WebhookService
from consumer.settings import Settings
from consumer.store.mongo import Mongo
from consumer.vault import Vault


async def _add(args: argparse.Namespace, settings: Settings) -> int:
    try:
        url = check_url(args.url)
        events = check_events(args.event or [])
        given = sys.stdin.readline().strip() if args.secret_stdin else args.secret
        secret = given or new_secret()
        secret_bytes(secret)
    except ValueError as exc:
        return fail("webhook add", str(exc), code=2)
    token = Vault.from_settings(settings).encrypt(secret)
    async with Mongo.connect(settings) as mongo:
        await mongo.webhooks.ensure_indexes()
        endpoint_id = await mongo.webhooks.add(args.domain, url, events, token)
    print(f"webhook {endpoint_id} for {args.domain.lower()}: {', '.join(events)}")
    if not given:
        print(f"secret (shown once): {secret}")
    return 0


async def _ls(args: argparse.Namespace, settings: Settings) -> int:
    async with Mongo.connect(settings) as mongo:
        endpoints = await mongo.webhooks.listed(args.domain)
    rows = [("ID", "DOMAIN", "ACTIVE", "EVENTS", "URL")]
    rows += [
        (
            str(e["_id"]),
            str(e["domain"]),
            "yes" if e.get("active") else f"no ({e.get('inactive_why', '-')})",
            ",".join(e.get("events", [])),
            shown_url(e["url"]),
        )
        for e in endpoints
    ]
    print(table(rows))
    return 0


async def _rm(args: argparse.Namespace, settings: Settings) -> int:
    async with Mongo.connect(settings) as mongo:
        removed = await mongo.webhooks.remove(args.id)
    if not removed:
        return fail("webhook rm", f"no webhook {args.id!r}")
    print(f"webhook {args.id} removed")
    return 0


async def _log(args: argparse.Namespace, settings: Settings) -> int:
    async with Mongo.connect(settings) as mongo:
        attempts = await mongo.webhooks.recent(args.domain, args.limit)
    rows = [("AT", "WEBHOOK", "EVENT", "JOB", "TRY", "STATUS", "HTTP", "ERROR")]
    rows += [
        (
            a["at"].isoformat(timespec="seconds"),
            str(a.get("endpoint", "-")),
            str(a.get("event", "-")),
            str(a.get("job", "-")),
            str(a.get("attempt", "-")),
            str(a.get("status", "-")),
            str(a.get("http") or "-"),
            str(a.get("error") or "-"),
        )
        for a in attempts
    ]
    print(table(rows))
    return 0


async def _serve(args: argparse.Namespace, settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await WebhookService.from_settings(settings).run(stop)
    return 0


def add_parser(verbs: Subparsers) -> None:
    """Register ``mailbus webhook`` and its actions on the top-level subparsers."""
    webhook = verbs.add_parser(
        "webhook",
        help="signed HTTP webhooks: a domain's events POSTed to its URLs",
        description="A domain's events (the bodies published on the events exchange) are "
        "POSTed as JSON to each of its webhooks that takes their type, signed as the "
        "Standard Webhooks specification says (webhook-id, webhook-timestamp, "
        "webhook-signature), by `mailbus webhook serve`. A failed attempt is retried with "
        "backoff for MAILBUS_WEBHOOK_MAX_AGE seconds. Secrets are stored encrypted with "
        "MAILBUS_SECRET_KEY, which these commands need.",
    )
    actions = webhook.add_subparsers(dest="webhook_verb", required=True, metavar="ACTION")

    add = actions.add_parser(
        "add",
        help="add a webhook to a domain",
        description="Add a webhook: DOMAIN's events of the given types are POSTed to URL. "
        "Without --secret a new secret is made and printed, once: the receiver verifies "
        "signatures with it. The URL must lead to a public address "
        "(MAILBUS_WEBHOOK_ALLOW_PRIVATE), checked at every delivery.",
    )
    add.add_argument("domain", help="the sending domain whose events are sent")
    add.add_argument("url", help="http(s) URL the events are POSTed to")
    add.add_argument(
        "--event",
        action="append",
        metavar="TYPE",
        help=f"an event type to send; repeat for more; default {ANY_EVENT} (all). "
        f"Known: {', '.join(sorted(known_events()))}",
    )
    given = add.add_mutually_exclusive_group()
    given.add_argument(
        "--secret",
        metavar="whsec_…",
        help="use this secret ('whsec_' and 24 to 64 bytes in base64) instead of a new one",
    )
    given.add_argument(
        "--secret-stdin",
        action="store_true",
        help="read the secret from standard input (kept out of the process list)",
    )
    add.set_defaults(handler=_add)

    ls = actions.add_parser(
        "ls",
        help="list webhooks",
        description="List webhooks (never their secrets; URLs without query or userinfo).",
    )
    ls.add_argument("--domain", help="only this domain's")
    ls.set_defaults(handler=_ls)

    rm = actions.add_parser(
        "rm",
        help="remove a webhook",
        description="Remove a webhook; its pending retries are dropped (exit 1 if none).",
    )
    rm.add_argument("id", help="the webhook's id (wh_…), as `ls` shows it")
    rm.set_defaults(handler=_rm)

    log = actions.add_parser(
        "log",
        help="show delivery attempts, newest first",
        description="Show webhook delivery attempts, newest first: each attempt's status "
        "(delivered, failed: tried again, dead: past MAILBUS_WEBHOOK_MAX_AGE, refused: a URL "
        "never delivered to, gone: 410 turned the webhook off, removed), the HTTP status and "
        "the error. Kept MAILBUS_WEBHOOK_LOG_DAYS.",
    )
    log.add_argument("--domain", help="only this domain's")
    log.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    log.set_defaults(handler=_log)

    serve = actions.add_parser(
        "serve",
        help="deliver webhooks (a long-running service)",
        description="Consume MAILBUS_PREFIX.webhooks (bound to the events exchange; declared "
        "here) and deliver each event to its domain's webhooks, MAILBUS_WEBHOOK_PREFETCH at "
        "a time, apart from the workers, so that a slow receiver never slows sending. "
        "SIGTERM or Ctrl-C finishes the deliveries under way (MAILBUS_DRAIN_TIMEOUT) and "
        "exits 0. Run one or more.",
    )
    serve.set_defaults(handler=_serve)
