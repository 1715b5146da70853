"""The ``mailbus`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import aio_pika
import uvloop
from aiormq.exceptions import ChannelNotFoundEntity
from pydantic import ValidationError

from consumer import __version__
from consumer.amqp import topology
from consumer.amqp.publish import job_message, jobs_exchange, publish_and_wait
from consumer.cli import config as cli_config
from consumer.cli import dead as cli_dead
from consumer.cli import domains as cli_domains
from consumer.cli import gateway as cli_gateway
from consumer.cli import jobs as cli_jobs
from consumer.cli import outboxes as cli_outboxes
from consumer.cli import providers as cli_providers
from consumer.cli import status as cli_status
from consumer.cli import suppressions as cli_suppressions
from consumer.cli import templates as cli_templates
from consumer.cli import webhooks as cli_webhooks
from consumer.cli.output import fail
from consumer.cli.parsing import Handler
from consumer.core import ladder
from consumer.core.message import Job, validation_context
from consumer.core.names import SEND_KEY, SEND_NOW_KEY, Names
from consumer.errors import (
    ConfigurationError,
    ManagementError,
    StoreUnavailableError,
    connection_failure,
)
from consumer.logging import configure_logging, get_logger
from consumer.service.wiring import build_worker
from consumer.settings import Settings, redact_url

log = get_logger(__name__)


async def _worker(args: argparse.Namespace, settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await build_worker(settings).run(stop)
    return 0


async def _topology_declare(args: argparse.Namespace, settings: Settings) -> int:
    names = Names(settings.prefix)
    async with await aio_pika.connect(settings.amqp_url.get_secret_value()) as connection:
        channel = await connection.channel()
        await topology.declare(channel, names, settings.delivery_limit)
    print(
        f"declared exchange {names.exchange!r}, queues {names.send_queue!r}, "
        f"{names.send_now_queue!r}, {names.due_queue!r}, {names.control_queue!r}, {names.dead!r}, "
        f"exchange {names.events!r} and the delay ladder {names.delay(0)!r}.."
        f"{names.delay(ladder.TOP)!r} into {names.deliver!r}"
    )
    return 0


def _job_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.json is not None:
        raw = sys.stdin.read() if args.json == "-" else Path(args.json).read_text()
        job: dict[str, Any] = json.loads(raw)
        return job
    job = {"domain": args.domain, "from": args.sender, "to": args.to, "subject": args.subject}
    for key, value in (("cc", args.cc), ("bcc", args.bcc), ("tags", args.tag)):
        if value:
            job[key] = value
    if args.reply_to:
        job["reply_to"] = args.reply_to
    text = Path(args.text_file).read_text() if args.text_file else args.text
    html = Path(args.html_file).read_text() if args.html_file else args.html
    if text is not None:
        job["text"] = text
    if html is not None:
        job["html"] = html
    if args.at:
        job["send_at"] = args.at
    if args.header:
        pairs = (h.partition(":") for h in args.header)
        job["headers"] = {name.strip(): value.strip() for name, _, value in pairs}
    return job


async def _send(args: argparse.Namespace, settings: Settings) -> int:
    job = _job_from_args(args)
    try:
        Job.model_validate(
            job, context=validation_context(special_use=settings.allow_special_use_domains)
        )
    except ValidationError as exc:
        return fail("send", f"invalid job: {exc}", code=2)
    delay_ms = round(args.delay * 1000) if args.delay else None
    key = SEND_NOW_KEY if args.now or args.wait else SEND_KEY
    names = Names(settings.prefix)
    async with await aio_pika.connect(settings.amqp_url.get_secret_value()) as connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await jobs_exchange(channel, names)
        if args.wait is None:
            message = job_message(job, job_id=args.id, delay_ms=delay_ms)
            await exchange.publish(message, routing_key=key, mandatory=True)
            print(message.message_id)
            return 0
        return await _send_and_wait(channel, exchange, job, args, delay_ms)


async def _send_and_wait(
    channel: aio_pika.abc.AbstractChannel,
    exchange: aio_pika.abc.AbstractExchange,
    job: dict[str, Any],
    args: argparse.Namespace,
    delay_ms: int | None,
) -> int:
    """Publish to ``send.now`` with a direct reply-to and print the worker's answer."""
    message = job_message(job, job_id=args.id, delay_ms=delay_ms)
    try:
        async with asyncio.timeout(args.wait):
            body = await publish_and_wait(channel, exchange, message, SEND_NOW_KEY)
    except TimeoutError:
        return fail("send", f"no answer within {args.wait} s for job {message.message_id}", code=3)
    print(body.decode())
    return 0 if json.loads(body).get("status") == "sent" else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailbus",
        description="Mail sending and scheduling over RabbitMQ, SMTP and MongoDB. "
        "Configuration comes from MAILBUS_* environment variables or a .env file.",
    )
    parser.add_argument("--version", action="version", version=f"mailbus {__version__}")
    parser.add_argument(
        "--env-file",
        metavar="PATH",
        default=".env",
        help="read MAILBUS_* settings from this file too (default: .env)",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    worker = verbs.add_parser(
        "worker",
        help="consume the send queues and send mail",
        description="Run one worker in the foreground: declares the topology, consumes "
        "mailbus.send and mailbus.send.now, sends through SMTP, records state in MongoDB. "
        "SIGTERM or Ctrl-C drains in-flight jobs (MAILBUS_DRAIN_TIMEOUT) and exits 0. "
        "Run as many as you like, on as many machines as you like.",
    )
    worker.set_defaults(handler=_worker)

    topo = verbs.add_parser("topology", help="manage the AMQP exchanges and queues")
    topo_verbs = topo.add_subparsers(dest="topology_verb", required=True, metavar="ACTION")
    declare = topo_verbs.add_parser(
        "declare",
        help="declare every exchange, queue and binding (idempotent)",
        description="Declare the mailbus exchanges and quorum queues on the broker at "
        "MAILBUS_AMQP_URL with names prefixed by MAILBUS_PREFIX. Workers do this at start too.",
    )
    declare.set_defaults(handler=_topology_declare)

    send = verbs.add_parser(
        "send",
        help="publish one mail job and print its id",
        description="Publish a mail job (publisher confirms on) and print the job id. "
        "Either give the fields as options or a whole v1 job with --json.",
    )
    send.add_argument("--json", metavar="FILE", help="publish this JSON job file (- for stdin)")
    send.add_argument("--domain", help="sending domain (selects the outboxes)")
    send.add_argument("--from", dest="sender", metavar="ADDRESS", help="From: address")
    send.add_argument(
        "--to",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="recipient; repeat for more; 'Name <a@b>' works",
    )
    send.add_argument("--cc", action="append", default=[], metavar="ADDRESS")
    send.add_argument("--bcc", action="append", default=[], metavar="ADDRESS")
    send.add_argument("--reply-to", metavar="ADDRESS")
    send.add_argument("--subject", default="")
    send.add_argument("--text", help="plain text body")
    send.add_argument("--text-file", metavar="FILE", help="plain text body from a file")
    send.add_argument("--html", help="HTML body")
    send.add_argument("--html-file", metavar="FILE", help="HTML body from a file")
    send.add_argument(
        "--header", action="append", metavar="NAME:VALUE", help="extra header; repeat for more"
    )
    send.add_argument("--tag", action="append", metavar="TAG", help="tag echoed in events")
    send.add_argument("--id", help="job id (idempotency key); default: a new UUID")
    send.add_argument("--delay", type=float, metavar="SECONDS", help="send this much later")
    send.add_argument("--at", metavar="RFC3339", help="send at this time (send_at)")
    send.add_argument(
        "--now", action="store_true", help="publish to send.now, the queue workers serve first"
    )
    send.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="publish to send.now and wait this long for the outcome; "
        "exit 0 if sent, 1 if not, 3 on no answer",
    )
    send.set_defaults(handler=_send)

    cli_jobs.add_parser(verbs)
    cli_outboxes.add_parser(verbs)
    cli_providers.add_parser(verbs)
    cli_domains.add_parser(verbs)
    cli_config.add_parser(verbs)
    cli_templates.add_parser(verbs)
    cli_dead.add_parser(verbs)
    cli_suppressions.add_parser(verbs)
    cli_status.add_parser(verbs)
    cli_gateway.add_parser(verbs)
    cli_webhooks.add_parser(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mailbus`` console script."""
    args = _parser().parse_args(argv)
    if args.verb == "send" and args.json is None:
        missing = [
            f"--{n}" for n, v in (("domain", args.domain), ("from", args.sender)) if not v
        ] + ([] if args.to else ["--to"])
        if missing:
            return fail("send", f"missing {', '.join(missing)} (or give --json)", code=2)
    try:
        settings = Settings(_env_file=args.env_file)
    except ValidationError as exc:
        print(f"mailbus: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    handler: Handler = args.handler
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(handler(args, settings))
    except ChannelNotFoundEntity:
        print(
            f"mailbus: exchange {settings.prefix!r} does not exist on the broker: run "
            "`mailbus topology declare` (or start a worker) first",
            file=sys.stderr,
        )
        return 1
    except ConfigurationError as exc:
        print(f"mailbus: {exc}", file=sys.stderr)
        return 2
    except ManagementError as exc:
        print(f"mailbus: {exc}", file=sys.stderr)
        return 1
    except StoreUnavailableError as exc:
        url = redact_url(settings.mongo_url.get_secret_value())
        print(f"mailbus: cannot reach MongoDB at {url}: {exc}", file=sys.stderr)
        return 1
    except ConnectionError as exc:
        url = redact_url(settings.amqp_url.get_secret_value())
        print(
            f"mailbus: cannot reach RabbitMQ at {url}: {connection_failure(exc)}", file=sys.stderr
        )
        return 1
