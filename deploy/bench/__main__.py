"""``make bench``: start a private stack, run worker processes, measure, print JSON.

Every part is real and on loopback: RabbitMQ, SecantusDB, an aiosmtpd sink and
``mailbus worker`` as its own process, as in production. Measured: the lateness of
scheduled mail (one worker), and the accuracy of a provider's rate limit (several).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import aio_pika

from consumer import topology
from consumer.settings import Settings
from deploy.bench import lateness, rate_limit
from deploy.devstack.mongo import PrivateMongo
from deploy.devstack.processes import spawn_worker
from deploy.devstack.rabbitmq import PrivateRabbit
from deploy.devstack.smtp_capture import CaptureServer


async def _lateness(
    args: argparse.Namespace, settings: Settings, smtp: CaptureServer, base: Path
) -> dict[str, Any]:
    async with await aio_pika.connect(settings.amqp_url.get_secret_value()) as connection:
        channel = await connection.channel()
        await topology.declare(channel, topology.Names(settings.prefix), settings.delivery_limit)
    worker = spawn_worker(settings, base / "worker.log")
    try:
        return await lateness.measure(
            settings, smtp, args.jobs, args.shortest, args.longest, args.rate
        )
    finally:
        worker.terminate()
        await asyncio.to_thread(worker.wait, 60)


async def _rate_limit(
    args: argparse.Namespace, settings: Settings, smtp: CaptureServer, base: Path
) -> dict[str, Any]:
    apart = settings.model_copy(update={"prefix": "ratebench", "mongo_db": "ratebench"})
    return await rate_limit.measure(
        apart,
        smtp,
        base,
        args.limit_workers,
        args.limit_per_second,
        args.limit_seconds,
        args.limit_burst,
    )


def main() -> int:
    """Run the benchmarks and print one JSON document."""
    parser = argparse.ArgumentParser(prog="python -m deploy.bench", description=__doc__)
    parser.add_argument("--jobs", type=int, default=2000, help="scheduled jobs (default 2000)")
    parser.add_argument("--shortest", type=float, default=1.0, help="shortest delay, s")
    parser.add_argument("--longest", type=float, default=60.0, help="longest delay, s")
    parser.add_argument("--rate", type=float, default=200.0, help="publish rate, jobs/s")
    parser.add_argument("--prefetch", type=int, default=Settings().prefetch, help="worker prefetch")
    parser.add_argument(
        "--limit-workers", type=int, default=4, help="worker processes sharing the rate limit"
    )
    parser.add_argument(
        "--limit-per-second", type=int, default=50, help="the provider's limit (default 50/s)"
    )
    parser.add_argument(
        "--limit-seconds", type=float, default=20.0, help="seconds of backlog at the limit"
    )
    parser.add_argument("--limit-burst", type=int, default=1, help="the provider's burst")
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mailbus-bench-") as tmp:
        base = Path(tmp)
        rabbit = PrivateRabbit(base / "rabbitmq")
        mongo = PrivateMongo(base / "mongo")
        smtp = CaptureServer()
        try:
            # The servers that only hold their port once started go first: RabbitMQ's
            # start opens many short-lived connections that could take a port reserved
            # for a server still waiting its turn.
            smtp.start()
            mongo.start()
            rabbit.start()
            settings = Settings(
                amqp_url=rabbit.amqp_url,
                mongo_url=mongo.url,
                default_smtp_url=smtp.url,
                log_format="json",
                log_level="WARNING",
                prefetch=args.prefetch,
                _env_file=None,
            )
            results = {
                "lateness": asyncio.run(_lateness(args, settings, smtp, base)),
                "rate_limit": asyncio.run(_rate_limit(args, settings, smtp, base)),
            }
        finally:
            smtp.stop()
            mongo.stop()
            rabbit.close()
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
