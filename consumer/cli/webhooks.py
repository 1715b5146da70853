"""``mailbus webhook``: a domain's signed HTTP webhooks, their delivery log, the service
that delivers them, and the deliveries it gave up on.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiormq.exceptions import ChannelNotFoundEntity

from consumer.amqp.dead_letters import WebhookDeadLetter, browse, is_webhook_letter
from consumer.cli.dead import SCAN, dead_letter_channel
from consumer.cli.output import fail, table, terminal_safe
from consumer.cli.parsing import Subparsers
from consumer.clock import utcnow
from consumer.core.names import Names
from consumer.core.schedule import to_epoch_ms
from consumer.core.webhooks import (
    ANY_EVENT,
    check_events,
    check_url,
    known_events,
    new_secret,
    secret_bytes,
)
from consumer.mail.fetch import shown_url
from consumer.service.webhooks import (
    InvalidDeliveryError,
    WebhookService,
    event_of,
    given_up,
    replayed_copy,
)
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


class NoDeadLettersError(Exception):
    """The webhooks' dead-letter queue does not exist: no webhook service ran here."""


@asynccontextmanager
async def _given_up(
    settings: Settings,
) -> AsyncIterator[tuple[AbstractChannel, Names, list[AbstractIncomingMessage]]]:
    """The oldest ``SCAN`` dead letters of ``<prefix>.webhooks.dead``, held (see
    :func:`consumer.amqp.dead_letters.browse`).
    """
    async with dead_letter_channel(settings) as (channel, names):
        try:
            async with browse(channel, names.webhooks_dead, SCAN) as held:
                yield channel, names, held
        except ChannelNotFoundEntity:
            raise NoDeadLettersError(names.webhooks_dead) from None


def _age(since: datetime | None, now: datetime) -> str:
    """``since`` as an age: 2d3h, 4h10m, 5m20s, 42s."""
    if since is None:
        return "-"
    seconds = max(int((now - since).total_seconds()), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def _no_queue(command: str, exc: NoDeadLettersError) -> int:
    return fail(command, f"no queue {exc}: `mailbus webhook serve` has not run here")


async def _dead(args: argparse.Namespace, settings: Settings) -> int:
    now = utcnow()
    try:
        async with _given_up(settings) as (_, _, held):
            letters = [given_up(m) for m in held]
    except NoDeadLettersError as exc:
        return _no_queue("webhook dead", exc)
    shown = letters[: args.limit]
    rows = [("ID", "WEBHOOK", "EVENT", "JOB", "REASON", "AGE", "TRIES", "ERROR")]
    rows += [
        (
            d.id,
            d.endpoint or "-",
            d.event or "-",
            d.letter.job_id or "-",
            d.letter.reason,
            _age(d.letter.dead_at, now),
            str(d.letter.attempts if d.letter.attempts is not None else "-"),
            (d.letter.error or "-")[:120],
        )
        for d in shown
    ]
    print(table(rows))
    if len(shown) < len(letters):
        print(f"({len(shown)} of {len(letters)} shown)", file=sys.stderr)
    return 0


async def _why_not(message: AbstractIncomingMessage, dead: WebhookDeadLetter, mongo: Mongo) -> str:
    """Why a given-up delivery cannot be replayed; empty when it can."""
    if dead.letter.reason == "invalid":
        return "invalid, it would be given up again"
    if not is_webhook_letter(message):
        return "not a webhook delivery (a job's dead letter? see `mailbus dead`)"
    try:
        event = event_of(message.body)
    except InvalidDeliveryError as exc:
        return str(exc)
    if dead.endpoint is None:
        return ""
    endpoint = await mongo.webhooks.get(dead.endpoint)
    if endpoint is None:
        return f"webhook {dead.endpoint} was removed"
    if not endpoint.get("active"):
        return f"webhook {dead.endpoint} is turned off ({endpoint.get('inactive_why', '-')})"
    if endpoint["domain"] != str(event.get("domain", "")).lower():
        return f"webhook {dead.endpoint} is not the event's domain's"
    return ""


async def _replay(args: argparse.Namespace, settings: Settings) -> int:
    if not (args.id or args.all):
        return fail("webhook replay", "give --id ID ... or --all", code=2)
    vault = Vault.from_settings(settings)
    wanted = set(args.id or ())
    replayed = 0
    try:
        async with _given_up(settings) as (channel, names, held), Mongo.connect(settings) as mongo:
            for message in held:
                dead = given_up(message)
                if not (args.all or dead.id in wanted):
                    continue
                wanted.discard(dead.id)
                shown_id = terminal_safe(dead.id)
                why = await _why_not(message, dead, mongo)
                if why:
                    print(f"{shown_id}: {terminal_safe(why)}, not replayed (left in the queue)")
                    continue
                attempts = dead.letter.attempts or 0
                copy = replayed_copy(message, attempts, vault, to_epoch_ms(utcnow()))
                await channel.default_exchange.publish(
                    copy, routing_key=names.webhooks_queue, mandatory=True
                )
                await message.ack()
                replayed += 1
                print(f"{shown_id}: replayed ({terminal_safe(dead.letter.reason)})")
    except NoDeadLettersError as exc:
        return _no_queue("webhook replay", exc)
    for missing in sorted(wanted):
        print(f"mailbus webhook replay: no given-up delivery {missing!r}", file=sys.stderr)
    print(f"{replayed} replayed")
    return 1 if wanted else 0


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
        "MAILBUS_SECRET_KEY, which these commands need. Deliveries given up on wait in "
        "MAILBUS_PREFIX.webhooks.dead: `dead` lists them, `replay` puts them back.",
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
        "With MAILBUS_HTTP_PORT set it serves /metrics, /healthz and /readyz (on "
        "MAILBUS_HTTP_HOST) as a worker does. "
        "SIGTERM or Ctrl-C finishes the deliveries under way (MAILBUS_DRAIN_TIMEOUT) and "
        "exits 0. Run one or more.",
    )
    serve.set_defaults(handler=_serve)

    dead = actions.add_parser(
        "dead",
        help="list deliveries given up on, oldest first",
        description="List the deliveries waiting in MAILBUS_PREFIX.webhooks.dead, oldest "
        f"first (of the oldest {SCAN}; nothing is taken away): the id `replay` takes (the "
        "webhook-id the endpoint was sent), the webhook, the event type, the job, why it "
        "was given up (expired: retried past MAILBUS_WEBHOOK_MAX_AGE, refused, gone, "
        "invalid, or the broker's delivery_limit), how long ago, the attempts and the last "
        "error. Never a secret.",
    )
    dead.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    dead.set_defaults(handler=_dead)

    replay = actions.add_parser(
        "replay",
        help="put given-up deliveries back for another round of attempts",
        description="Put given-up deliveries back on MAILBUS_PREFIX.webhooks, each for the "
        "webhook it was given up for alone (one the broker gave up on before any webhook: "
        "as the event, for all), at once, with MAILBUS_WEBHOOK_MAX_AGE counted afresh, and "
        "take them out of the dead-letter queue; `mailbus webhook serve` delivers them, "
        "with the webhook-id they had. Needs MAILBUS_SECRET_KEY. One whose "
        "webhook was removed or turned off, or that is invalid, is left in the queue (exit "
        "0); a job's dead letter is never replayed here, nor a webhook delivery by "
        "`mailbus dead replay`. Exit 1 when an --id is not found.",
    )
    chosen = replay.add_mutually_exclusive_group()
    chosen.add_argument(
        "--id", nargs="+", metavar="ID", help="the ids `mailbus webhook dead` shows (msg_…)"
    )
    chosen.add_argument("--all", action="store_true", help="every given-up delivery")
    replay.set_defaults(handler=_replay)
