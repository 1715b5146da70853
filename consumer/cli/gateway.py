"""``mailbus gateway``: the compatibility gateways for the older systems' clients."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import signal
import sys

from consumer.cli.output import fail
from consumer.cli.parsing import Subparsers
from consumer.service.gateway import Listen, listen_address, serve
from consumer.settings import Settings
from consumer.store.domains import hash_key


async def _serve(args: argparse.Namespace, settings: Settings) -> int:
    listens: dict[str, Listen | None] = {
        name: getattr(args, name) for name in ("rest", "daemon", "smtp", "smtps", "bounces")
    }
    if all(listen is None for listen in listens.values()):
        return fail("gateway serve", "give --rest, --daemon, --smtp, --smtps or --bounces", code=2)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started: asyncio.Future[dict[str, int]] = loop.create_future()
    tls = settings.gateway_tls_cert is not None
    started.add_done_callback(lambda done: _announce(listens, done.result(), tls=tls))
    await serve(settings, stop, **listens, started=started)
    return 0


def _announce(listens: dict[str, Listen | None], ports: dict[str, int], *, tls: bool) -> None:
    """Say where the gateways listen (the ports bound, when 0 was asked for)."""
    shown = {
        "rest": ("REST gateway", "http", "/api/mail"),
        "daemon": ("daemon gateway", "tls" if tls else "tcp", ""),
        "smtp": ("SMTP gateway", "smtp", " (STARTTLS)" if tls else ""),
        "smtps": ("SMTP gateway", "smtps", ""),
        "bounces": ("bounce listener", "smtp", " (MX of the bounce domains)"),
    }
    for name, listen in listens.items():
        if listen is not None:
            what, scheme, tail = shown[name]
            verb = "PUT " if name == "rest" else ""
            print(f"{what}: {verb}{scheme}://{listen.host}:{ports[name]}{tail}", flush=True)


def _read_password() -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("API password: ")
    if first != getpass.getpass("Again: "):
        raise ValueError("the two passwords differ")
    return first


async def _hash_password(args: argparse.Namespace, settings: Settings) -> int:
    try:
        password = _read_password()
    except ValueError as exc:
        return fail("gateway hash-password", str(exc), code=2)
    if not password:
        return fail("gateway hash-password", "empty password", code=2)
    print(hash_key(password))
    return 0


def add_parser(verbs: Subparsers) -> None:
    """Register ``mailbus gateway`` and its actions on the top-level subparsers."""
    gateway = verbs.add_parser(
        "gateway",
        help="serve the old REST server's and the old daemon's APIs",
        description="Compatibility gateways for teams migrating from the older systems: "
        "their clients keep their requests and read the answers they used to, while the mail "
        "goes through mailbus (each request becomes a v1 job on the broker).",
    )
    actions = gateway.add_subparsers(dest="gateway_verb", required=True, metavar="ACTION")
    run = actions.add_parser(
        "serve",
        help="listen for old-style requests and publish them as jobs",
        description="--rest serves the REST mail server's PUT /api/mail (form or JSON fields "
        "domain, domain_key, to_email, to_name, subject, body, from_email, from_name, cc, bcc, "
        "attach_list, send_now): the domain must be registered (`mailbus domain add`) and the "
        "domain key must match, or an X-API-KEY header must hold one of the domain's API keys "
        "(`mailbus domain api-key add`; then domain_key is not needed, and is ignored; a wrong "
        "key is answered 'Invalid API Key.' with HTTP 403; the gateway and the workers need "
        "MAILBUS_SECRET_KEY). Answers are JSON, or the old server's XML "
        "(<?xml ...?><xml><status>..</status><message>..</message><id>..</id></xml>) when "
        "asked for by /api/mail.xml, /api/mail/format/xml, ?format=xml or an Accept header "
        "naming xml (but not html); any other format the old server knew (jsonp, serialized, "
        "php, html, csv) asked for by the address or ?format= is refused with HTTP 406 and a "
        "JSON answer (one an Accept header prefers is answered in JSON). --rest also serves "
        "the one-click unsubscribe links workers put in mail (GET /unsubscribe/TOKEN: a page "
        "asking to confirm; POST: the recipient leaves that list): expose it at "
        "MAILBUS_UNSUBSCRIBE_URL over https; tokens are checked with MAILBUS_SECRET_KEY. "
        "--daemon serves the SMTP mailer daemon's JSON over TCP, one request (any JSON value) "
        "a connection, every request the daemon served: sendMail, queueMail, ping, status, "
        "the queue (getQueueList, getQueuedMail, updateQueuedMail, removeQueuedMail, "
        "clearQueue: the domain's waiting jobs) and the templates (getTemplateList, "
        "getTemplate, addTemplate, updateTemplate, removeTemplate, clearTemplate: the "
        "domain's stored templates, kept as the files of MAILBUS_GATEWAY_TEMPLATE_DIR when "
        'set). Each request carries "auth", the password whose hash is '
        "MAILBUS_GATEWAY_PASSWORD_HASH (mailbus's own, or the old daemon's bcrypt or Argon2 "
        "hash as it was); without a hash the daemon gateway is open, and only on loopback "
        "unless MAILBUS_GATEWAY_OPEN_BEYOND_LOOPBACK is true. Its mail is sent for "
        "MAILBUS_GATEWAY_DOMAIN from MAILBUS_GATEWAY_FROM unless a request names fromEmail; "
        "per-request SMTP settings only with MAILBUS_GATEWAY_SMTP_OVERRIDES. "
        "Requests over MAILBUS_GATEWAY_MAX_REQUEST_BYTES are refused; a send-now waits up to "
        "MAILBUS_GATEWAY_WAIT_SECONDS for the outcome. Clients that do not behave are let go: "
        "past MAILBUS_GATEWAY_MAX_CONNECTIONS the one waiting longest for its request makes "
        "room; headers (the daemon: first bytes) must come within "
        "MAILBUS_GATEWAY_HEADER_TIMEOUT and the rest within MAILBUS_GATEWAY_READ_TIMEOUT; an "
        "address none of whose requests has authenticated may send "
        "MAILBUS_GATEWAY_UNAUTHENTICATED_BYTES at most; past MAILBUS_GATEWAY_AUTH_FAILURES "
        "wrong passwords or keys within MAILBUS_GATEWAY_AUTH_WINDOW it is refused unhashed. "
        "With MAILBUS_GATEWAY_TLS_CERT and MAILBUS_GATEWAY_TLS_KEY (a PEM certificate chain "
        "and its key, the old MAILER_SSL_CERT and MAILER_SSL_KEY) the daemon gateway serves "
        "TLS only, its handshake within the header timeout. "
        "--smtp and --smtps take mail by SMTP submission, as every application framework "
        "sends it: AUTH PLAIN or LOGIN as DOMAIN (a registered domain; its domain key or one of "
        "its API keys) or NAME@DOMAIN (its API key named NAME), over TLS (STARTTLS with the "
        "certificate above, or --smtps) unless MAILBUS_GATEWAY_SMTP_LOOPBACK_PLAIN_AUTH allows "
        "plain text on a loopback listener; each message becomes a raw job, answered 250 once "
        "the broker confirmed it and 451 while the broker or the registry is away; at most "
        "MAILBUS_GATEWAY_SMTP_MAX_RECIPIENTS recipients and MAILBUS_MAX_MESSAGE_BYTES a "
        "message; X-Mailbus-Send-At, -Delay, -Id, -Tags, -Expires-At, -Unsubscribe (a list: "
        "a one-click unsubscribe link for the one recipient) and -Unsubscribe-Mailto header "
        "fields steer "
        "the job and are removed; the jobs are sealed with MAILBUS_SECRET_KEY, which the "
        "workers share. "
        "--bounces is the MX of the bounce domains: with MAILBUS_BOUNCE_DOMAIN set, or a "
        "registered domain's own (mailbus domain bounce-domain), the workers send each mail "
        "with a return address of its own there (VERP, signed with MAILBUS_SECRET_KEY, "
        "valid at that one domain), and this listener takes delivery status notifications (RFC "
        "3464), complaints (ARF, RFC 5965) and the common non-standard bounces sent to valid "
        "return addresses only (any other recipient is refused 550), at most "
        "MAILBUS_BOUNCE_MAX_MESSAGE_BYTES a message, no AUTH; a hard bounce or a complaint "
        "suppresses its recipient for the job's domain, every one is kept on the job's record "
        "and published as mail.bounced or mail.complained; mail that is no readable report "
        "is answered 250 and dropped. With MAILBUS_HTTP_PORT set, /healthz, /readyz (every "
        "listener listening, RabbitMQ connected, MongoDB answering; 503 from SIGTERM on) and "
        "/metrics (the connections held) are served on that port of MAILBUS_HTTP_HOST "
        "(loopback by default). SIGTERM lets requests in progress finish (SMTP "
        "sessions are then told 421).",
    )
    run.add_argument(
        "--rest",
        type=listen_address,
        metavar="[HOST:]PORT",
        help="serve PUT /api/mail and /unsubscribe/TOKEN here (host defaults to 127.0.0.1; "
        "port 0 picks one)",
    )
    run.add_argument(
        "--daemon",
        type=listen_address,
        metavar="[HOST:]PORT",
        help="serve the daemon's JSON over TCP here (the old default port was 3000)",
    )
    run.add_argument(
        "--smtp",
        type=listen_address,
        metavar="[HOST:]PORT",
        help="take mail by SMTP submission here (STARTTLS when MAILBUS_GATEWAY_TLS_CERT is "
        "set; port 587 is the standard one)",
    )
    run.add_argument(
        "--smtps",
        type=listen_address,
        metavar="[HOST:]PORT",
        help="take mail by SMTP submission over implicit TLS here (port 465 is the standard one)",
    )
    run.add_argument(
        "--bounces",
        type=listen_address,
        metavar="[HOST:]PORT",
        help="take bounces and complaints for the bounce domains here, as their MX (port 25 "
        "is the standard one; needs MAILBUS_SECRET_KEY)",
    )
    run.set_defaults(handler=_serve)
    hashing = actions.add_parser(
        "hash-password",
        help="print the hash of an API password, for MAILBUS_GATEWAY_PASSWORD_HASH",
        description="Reads the password from standard input (or asks twice on a terminal) "
        "and prints its salted scrypt hash; only the hash goes in the settings.",
    )
    hashing.set_defaults(handler=_hash_password)
