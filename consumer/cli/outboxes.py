"""``mailbus outbox``: the SMTP accounts of each sending domain, kept in MongoDB."""

from __future__ import annotations

import argparse
import shutil
import sys
from typing import Any

import aiosmtplib
from pydantic import SecretStr

from consumer.cli.output import fail, pretty_json, table, terminal_safe
from consumer.cli.parsing import Subparsers
from consumer.clock import utcnow
from consumer.core.message import charset_name
from consumer.core.outboxes import DEFAULT_SENDMAIL, Outbox
from consumer.errors import ConfigurationError
from consumer.mail.transport import client
from consumer.settings import Settings
from consumer.store.mongo import Mongo
from consumer.store.outboxes import describe, outbox_document, outbox_from_document
from consumer.vault import Vault, new_key


async def _add(args: argparse.Namespace, settings: Settings) -> int:
    if args.transport == "smtp" and not args.host:
        raise ConfigurationError("an smtp outbox needs --host")
    password = None
    if args.password_stdin:
        password = SecretStr(sys.stdin.readline().rstrip("\r\n"))
    port = args.port or (465 if args.security == "tls" else 587)
    outbox = Outbox(
        name=args.name,
        host=args.host or "",
        port=port,
        security=args.security,
        username=args.username,
        password=password,
        verify_tls=not args.no_verify,
        timeout=args.timeout,
        max_connections=args.max_connections,
        transport=args.transport,
        command=args.sendmail_path,
        charset=args.charset,
    )
    doc = outbox_document(outbox, args.domain, args.provider, Vault.optional(settings), utcnow())
    async with Mongo.connect(settings) as mongo:
        await mongo.outboxes.ensure_indexes()
        if not await mongo.outboxes.put(doc, replace=args.replace):
            return fail("outbox add", f"{args.name!r} exists (use --replace)")
    print(f"outbox {args.name!r} for {args.domain} stored")
    return 0


async def _ls(args: argparse.Namespace, settings: Settings) -> int:
    async with Mongo.connect(settings) as mongo:
        docs = await mongo.outboxes.find(args.domain)
    rows = [("NAME", "DOMAIN", "PROVIDER", "SERVER", "SECURITY", "USER", "ACTIVE", "SENT")]
    rows += [
        (
            str(d["_id"]),
            str(d["domain"]),
            str(d.get("provider") or "-"),
            str(d.get("command"))
            if d.get("transport") == "sendmail"
            else f"{d['host']}:{d['port']}",
            str(d["security"]),
            str(d.get("username") or "-"),
            "yes" if d.get("active") else "no",
            str(d.get("sent_count", 0)),
        )
        for d in docs
    ]
    print(table(rows))
    return 0


async def _stored(args: argparse.Namespace, settings: Settings) -> dict[str, Any] | None:
    """The outbox named on the command line, None if there is none."""
    async with Mongo.connect(settings) as mongo:
        return await mongo.outboxes.get(args.name)


def _no_outbox(args: argparse.Namespace) -> int:
    """Say on stderr that the outbox named on the command line does not exist."""
    return fail(f"outbox {args.outbox_verb}", f"no outbox {args.name!r}")


async def _show(args: argparse.Namespace, settings: Settings) -> int:
    doc = await _stored(args, settings)
    if doc is None:
        return _no_outbox(args)
    print(pretty_json(describe(doc)))
    return 0


async def _switch(args: argparse.Namespace, settings: Settings) -> int:
    async with Mongo.connect(settings) as mongo:
        if args.outbox_verb == "rm":
            found = await mongo.outboxes.remove(args.name)
        else:
            found = await mongo.outboxes.set_active(args.name, args.outbox_verb == "enable")
    if not found:
        return _no_outbox(args)
    print(f"outbox {args.name!r}: {args.outbox_verb} done")
    return 0


async def _test(args: argparse.Namespace, settings: Settings) -> int:
    doc = await _stored(args, settings)
    if doc is None:
        return _no_outbox(args)
    outbox = outbox_from_document(doc, Vault.optional(settings))
    if outbox.transport == "sendmail":
        if shutil.which(outbox.command) is None:
            print(f"FAILED {args.name}: {outbox.command} is not an executable program")
            return 1
        print(f"OK {args.name} (sendmail program {outbox.command})")
        return 0
    smtp = client(outbox)
    steps = f"{outbox.host}:{outbox.port}, {outbox.security}"
    if outbox.username:
        steps += f", AUTH as {outbox.username}"
    try:
        await smtp.connect()
        await smtp.quit()
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        print(f"FAILED {args.name} ({steps}): {type(exc).__name__}: {terminal_safe(str(exc))}")
        return 1
    print(f"OK {args.name} ({steps})")
    return 0


async def _rotate(args: argparse.Namespace, settings: Settings) -> int:
    vault = Vault.from_settings(settings)
    async with Mongo.connect(settings) as mongo:
        rotated = 0
        for doc in await mongo.outboxes.find(encrypted=True):
            if doc.get("password"):
                await mongo.outboxes.store_password(doc["_id"], vault.rotate(doc["password"]))
                rotated += 1
        dkim_keys = 0
        for domain in await mongo.domains.find():
            for key in domain.get("dkim_keys", []):
                token = vault.rotate(key["private_key"])
                await mongo.domains.store_dkim_key(domain["_id"], key["selector"], token)
                dkim_keys += 1
    print(
        f"re-encrypted {rotated} outbox password(s) and {dkim_keys} DKIM key(s) with the "
        "first MAILBUS_SECRET_KEY key"
    )
    return 0


async def _new_key(args: argparse.Namespace, settings: Settings) -> int:
    print(new_key())
    return 0


def add_parser(verbs: Subparsers) -> None:
    """Register ``mailbus outbox`` and its actions on the top-level subparsers."""
    outbox = verbs.add_parser(
        "outbox",
        help="manage the SMTP outboxes of each sending domain",
        description="Outboxes live in MongoDB. A job goes out through the active outbox of "
        "its domain that has sent least among those whose provider has a token (round "
        "robin across every worker, see `mailbus provider`); a domain "
        "without one uses MAILBUS_DEFAULT_SMTP_URL, or the job is dead-lettered no_outbox. "
        "Passwords are stored encrypted with MAILBUS_SECRET_KEY and never printed.",
    )
    actions = outbox.add_subparsers(dest="outbox_verb", required=True, metavar="ACTION")

    add = actions.add_parser(
        "add",
        help="store an outbox",
        description="Store an outbox for a domain: an SMTP account, or a local sendmail "
        "program (--transport sendmail). The password, if any, is read from standard input "
        "(--password-stdin) and stored encrypted.",
    )
    add.add_argument("--domain", required=True, help="the sending domain it serves")
    add.add_argument("--name", required=True, help="a unique name, e.g. gmail-1")
    add.add_argument("--provider", help="the provider whose rate limits apply, e.g. gmail")
    add.add_argument(
        "--transport",
        choices=("smtp", "sendmail"),
        default="smtp",
        help="smtp (default), or sendmail: pipe each message to a local sendmail program",
    )
    add.add_argument(
        "--sendmail-path",
        default=DEFAULT_SENDMAIL,
        help=f"the sendmail program of a sendmail outbox (default {DEFAULT_SENDMAIL}); it "
        "is run as PATH -i -f SENDER -- RECIPIENT...",
    )
    add.add_argument("--host", help="SMTP server host name (smtp outboxes)")
    add.add_argument("--port", type=int, help="default: 465 with --security tls, else 587")
    add.add_argument(
        "--security",
        choices=("starttls", "tls", "none"),
        default="starttls",
        help="default: starttls",
    )
    add.add_argument("--username", help="AUTH user name (AUTH is skipped without one)")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add.add_argument(
        "--no-verify", action="store_true", help="do not verify the server's TLS certificate"
    )
    add.add_argument("--timeout", type=float, default=30.0, help="seconds per SMTP operation")
    add.add_argument(
        "--max-connections",
        type=int,
        help="connections per worker (default MAILBUS_SMTP_POOL_SIZE)",
    )
    add.add_argument(
        "--charset",
        type=charset_name,
        help="write bodies in this charset (e.g. iso-8859-1) unless a job names its own; "
        "default utf-8",
    )
    add.add_argument(
        "--replace",
        action="store_true",
        help="overwrite an existing outbox with exactly these options (a password not "
        "given is removed); its count and active state are kept",
    )
    add.set_defaults(handler=_add)

    ls = actions.add_parser("ls", help="list outboxes", description="List outboxes.")
    ls.add_argument("--domain", help="only this domain's")
    ls.set_defaults(handler=_ls)

    for verb, text in (
        ("show", "print one outbox as JSON (the password only as set or not)"),
        ("enable", "let an outbox send again"),
        ("disable", "stop choosing an outbox (mail in flight finishes)"),
        ("rm", "delete an outbox"),
        ("test", "connect, EHLO, STARTTLS, AUTH and QUIT, and report (exit 1 on failure)"),
    ):
        action = actions.add_parser(verb, help=text, description=text[0].upper() + text[1:] + ".")
        action.add_argument("name", help="the outbox name")
        handler = {"show": _show, "test": _test}.get(verb, _switch)
        action.set_defaults(handler=handler)

    key = actions.add_parser(
        "new-key",
        help="print a new key for MAILBUS_SECRET_KEY",
        description="Print a new Fernet key. To rotate: put it first in MAILBUS_SECRET_KEY "
        "(comma-separated, old keys after it), run `mailbus outbox rotate-key`, then drop "
        "the old keys.",
    )
    key.set_defaults(handler=_new_key)
    rotate = actions.add_parser(
        "rotate-key",
        help="re-encrypt every stored password and DKIM key with the first key",
        description="Re-encrypt every stored outbox password and domain DKIM key with the "
        "first key of MAILBUS_SECRET_KEY.",
    )
    rotate.set_defaults(handler=_rotate)
