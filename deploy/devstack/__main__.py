"""``make run``: the embedded default stack and one worker in the foreground.

Starts a private RabbitMQ (management UI on), a SecantusDB server and an SMTP capture
server, all on free loopback ports with state under ``.devstack/``; declares the topology;
sends one demo mail through the whole pipeline; then keeps the worker running until
Ctrl-C, printing every mail the capture server receives.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import aio_pika

from consumer.amqp import topology
from consumer.amqp.publish import publish_job
from consumer.core.names import Names
from consumer.logging import configure_logging
from consumer.service.wiring import build_worker
from consumer.settings import Settings
from deploy.devstack.mongo import PrivateMongo
from deploy.devstack.rabbitmq import PrivateRabbit
from deploy.devstack.smtp_capture import Captured, CaptureServer

DEMO_JOB = {
    "domain": "example.com",
    "from": {"email": "demo@example.com", "name": "mailbus demo"},
    "to": ["Zoë Example <zoe@example.org>"],
    "subject": "Hello from mailbus ✉",
    "text": "It works: this mail went RabbitMQ → worker → SMTP.",
    "html": "<p>It works: this mail went <b>RabbitMQ → worker → SMTP</b>.</p>",
}


def _show(mail_dir: Path) -> Callable[[Captured], None]:
    def on_message(item: Captured) -> None:
        msg = item.message()
        path = mail_dir / f"{item.received_at:.6f}.eml"
        path.write_bytes(item.data)
        print(
            f"\n>>> SMTP capture received: From {msg['From']} To {', '.join(item.rcpt_tos)} "
            f"Subject {msg['Subject']!r} ({len(item.data)} bytes, saved to {path})\n",
            flush=True,
        )

    return on_message


async def _run(
    state: Path, rabbit: PrivateRabbit, mongo: PrivateMongo, smtp: CaptureServer
) -> None:
    settings = Settings(
        amqp_url=rabbit.amqp_url,
        mongo_url=mongo.url,
        default_smtp_url=smtp.url,
        log_format="console",
        _env_file=None,
    )
    configure_logging(settings)
    env_file = state / "mailbus.env"
    env_file.write_text(
        f"MAILBUS_AMQP_URL={rabbit.amqp_url}\nMAILBUS_MONGO_URL={mongo.url}\n"
        f"MAILBUS_DEFAULT_SMTP_URL={smtp.url}\n"
    )
    async with await aio_pika.connect(rabbit.amqp_url) as connection:
        channel = await connection.channel()
        names = Names(settings.prefix)
        await topology.declare(channel, names, settings.delivery_limit)
        job_id = await publish_job(channel, DEMO_JOB, names=names)
    print(
        f"\nmailbus dev stack is up (state in {state}/):\n"
        f"  RabbitMQ      {rabbit.amqp_url}   management UI {rabbit.management_url} "
        f"(user {rabbit.user}, password {rabbit.password})\n"
        f"  MongoDB API   {mongo.url}   (SecantusDB, in memory)\n"
        f"  SMTP capture  127.0.0.1:{smtp.port}   mails saved to {state}/mail/\n"
        f"Published demo job {job_id}; the worker below sends it.\n"
        f"Send your own from another terminal:\n"
        f"  .venv/bin/mailbus --env-file {env_file} send --domain example.com \\\n"
        f"      --from you@example.com --to someone@example.org --subject Hi --text Hello\n"
        f"Stop with Ctrl-C.\n",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await build_worker(settings).run(stop)


def main() -> int:
    """Start the stack, run the worker until interrupted, stop everything."""
    parser = argparse.ArgumentParser(prog="python -m deploy.devstack", description=__doc__)
    parser.add_argument(
        "--state",
        type=Path,
        default=Path(".devstack"),
        help="directory for the stack's data and logs (default: .devstack)",
    )
    args = parser.parse_args()
    state: Path = args.state.resolve()
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(state)
    (state / "mail").mkdir(parents=True)
    rabbit = PrivateRabbit(state / "rabbitmq")
    mongo = PrivateMongo(state / "mongo")
    smtp = CaptureServer(on_message=_show(state / "mail"))
    print("starting RabbitMQ, SecantusDB and the SMTP capture server ...", flush=True)
    try:
        # The servers that only hold their port once started go first: RabbitMQ's start
        # opens many short-lived connections that could take a port reserved for another.
        smtp.start()
        mongo.start()
        rabbit.start()
        asyncio.run(_run(state, rabbit, mongo, smtp))
    finally:
        smtp.stop()
        mongo.stop()
        rabbit.close()
        print("dev stack stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
