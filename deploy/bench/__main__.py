"""``make bench``: start a private stack, run worker processes, measure, print JSON.

Every part is real and on loopback: RabbitMQ, SecantusDB, SMTP sinks (Postfix's
``smtp-sink`` for throughput, aiosmtpd where each mail's arrival time matters) and
``mailbus worker`` as its own process, as in production. Measured: throughput with one
and two workers beside the C and Python SMTP ceilings and a Celery peer (prefork x2,
``EmailMessage`` and ``smtplib``: ``deploy/bench/celery_app.py``), with a 100 KB
attachment too, MongoDB commands and AMQP bytes per mail, RSS and CPU (with a soak run),
the lateness of scheduled mail (one worker), and the accuracy of a provider's rate limit
(several).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aio_pika

from consumer.amqp import topology
from consumer.core.names import Names
from consumer.settings import Settings
from deploy.bench import celery_peer, lateness, rate_limit, targets, throughput
from deploy.bench.process_stats import descendants
from deploy.bench.smtp_sink import SmtpSink
from deploy.devstack.mongo import PrivateMongo
from deploy.devstack.processes import spawn_worker
from deploy.devstack.rabbitmq import PrivateRabbit
from deploy.devstack.smtp_capture import CaptureServer

SCENARIOS = ("throughput", "attachment", "soak", "lateness", "rate_limit")


async def _lateness(
    args: argparse.Namespace, settings: Settings, smtp: CaptureServer, base: Path
) -> dict[str, Any]:
    names = Names(settings.prefix)
    worker = None
    try:
        async with await aio_pika.connect(settings.amqp_url.get_secret_value()) as connection:
            channel = await connection.channel()
            await topology.declare(channel, names, settings.delivery_limit)
            worker = spawn_worker(settings, base / "worker.log")
            # Publishing starts once the worker consumes: its start-up is not lateness.
            async with asyncio.timeout(120):
                while not await rate_limit.consumers(channel, names.send_queue):  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
        return await lateness.measure(
            settings, smtp, args.jobs, args.shortest, args.longest, args.rate
        )
    finally:
        if worker is not None:
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


async def _throughput(
    args: argparse.Namespace,
    settings: Settings,
    rabbit: PrivateRabbit,
    mongo: PrivateMongo,
    base: Path,
    scenarios: set[str],
) -> dict[str, Any]:
    """The scenarios of :mod:`deploy.bench.throughput` among ``scenarios``."""
    files = base / "files"
    files.mkdir(exist_ok=True)
    attachment = files / "report.pdf"
    attachment.write_bytes(os.urandom(args.attachment_kb * 1024))
    sink = SmtpSink()
    await sink.start()
    try:
        worker_settings = settings.model_copy(
            update={"default_smtp_url": None, "attachment_dirs": [files]}
        )
        servers = {
            "rabbitmq": descendants(rabbit.pid or 0),
            "mongodb": descendants(mongo.pid or 0),
            "smtp_sink": descendants(sink.pid or 0),
        }
        stack = throughput.Stack(
            worker_settings, rabbit.management_url, sink, base, servers, mongo.prune_ttl
        )
        pool = settings.smtp_pool_size
        results: dict[str, Any] = {}
        if "throughput" in scenarios:
            results["references"] = await throughput.references(stack, args.mails, pool, args.size)
            amqp_url = settings.amqp_url.get_secret_value()
            peer = await celery_peer.measure(
                amqp_url, sink, args.mails, args.size, base / "celery-peer.log", servers
            )
            results["celery_peer"] = peer
            one = await throughput.run(stack, "tp1", 1, args.mails, args.size)
            two = await throughput.run(stack, "tp2", 2, args.mails, args.size)
            loop_rate = results["references"]["aiosmtplib_loop_per_second"]
            one["ratio_to_aiosmtplib_loop"] = round(one["mails_per_second"] / loop_rate, 3)
            # Side by side in one run: mailbus's throughput and CPU per mail over the peer's.
            one["ratio_to_celery_peer"] = round(
                one["mails_per_second"] / peer["mails_per_second"], 3
            )
            one["cpu_ratio_to_celery_peer"] = round(
                one["cpu_seconds_per_1000_mails"] / peer["cpu_seconds_per_1000_mails"], 3
            )
            two["ratio_to_one_worker"] = round(two["mails_per_second"] / one["mails_per_second"], 3)
            results["one_worker"], results["two_workers"] = one, two
        if "attachment" in scenarios:
            results["attachment"] = await throughput.run(
                stack, "tpatt", 1, args.attachment_mails, args.size, attachment
            )
        if "soak" in scenarios:
            results["soak"] = await throughput.soak(
                stack, args.soak_mails, args.soak_rounds, args.size
            )
        return results
    finally:
        await sink.stop()


class Report:
    """The results so far, written to ``out`` after each scenario, so a scenario that
    fails (recorded under ``failed``) loses nothing the others measured.
    """

    def __init__(self, results: dict[str, Any], out: Path | None) -> None:
        self.results = results
        self.out = out

    def run(
        self, name: str, scenario: Coroutine[Any, Any, dict[str, Any]], key: str | None = None
    ) -> None:
        """Run ``scenario``; its result goes under ``key``, or is merged in without one."""
        try:
            result = asyncio.run(scenario)
        except Exception as exc:  # one broken scenario must not cost the others' figures
            self.results.setdefault("failed", {})[name] = f"{type(exc).__name__}: {exc}"
        else:
            self.results.update({key: result} if key else result)
        self.write()

    def write(self) -> None:
        """Write the results so far to ``out`` (if given)."""
        if self.out is not None:
            self.out.write_text(json.dumps(self.results, indent=2) + "\n")


def main() -> int:
    """Run the benchmarks and print one JSON document."""
    parser = argparse.ArgumentParser(prog="python -m deploy.bench", description=__doc__)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SCENARIOS,
        default=list(SCENARIOS),
        help="run these scenarios only (default: all)",
    )
    parser.add_argument("--mails", type=int, default=20_000, help="throughput backlog (20000)")
    parser.add_argument("--size", type=int, default=2048, help="bytes per mail (2048)")
    parser.add_argument("--attachment-kb", type=int, default=100, help="attachment size (100)")
    parser.add_argument(
        "--attachment-mails", type=int, default=5000, help="backlog with attachments (5000)"
    )
    parser.add_argument("--soak-mails", type=int, default=100_000, help="soak run (100000)")
    parser.add_argument("--soak-rounds", type=int, default=10, help="backlogs in the soak (10)")
    parser.add_argument("--jobs", type=int, default=2000, help="scheduled jobs (default 2000)")
    parser.add_argument("--shortest", type=float, default=1.0, help="shortest delay, s")
    parser.add_argument("--longest", type=float, default=60.0, help="longest delay, s")
    parser.add_argument("--rate", type=float, default=200.0, help="publish rate, jobs/s")
    parser.add_argument(
        "--lateness-runs", type=int, default=5, help="consecutive lateness runs (default 5)"
    )
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
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the stack's files and worker logs here (default: a temp dir)",
    )
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mailbus-bench-") as tmp:
        base = args.workdir or Path(tmp)
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
            only = set(args.only)
            results: dict[str, Any] = {}
            report = Report(results, args.out)
            report.run(
                "throughput",
                _throughput(
                    args, settings, rabbit, mongo, base, only & {"throughput", "attachment"}
                ),
            )
            # Each scenario below starts on a fresh (in-memory) test server: SecantusDB
            # slows down as it accumulates, which would measure its history, not mailbus.
            if "lateness" in only:
                report.run(
                    "lateness", _lateness_runs(args, settings, mongo, smtp, base), key="lateness"
                )
            if "rate_limit" in only:
                mongo.restart()
                report.run("rate_limit", _rate_limit(args, settings, smtp, base), key="rate_limit")
            if "soak" in only:
                mongo.restart()
                report.run("soak", _throughput(args, settings, rabbit, mongo, base, {"soak"}))
            if "one_worker" in results:
                results["scale_out"] = targets.scale_out(results["one_worker"])
            results["targets"] = targets.targets(results)
            report.write()
        finally:
            smtp.stop()
            mongo.stop()
            rabbit.close()
    print(json.dumps(results, indent=2))
    return 1 if "failed" in results else 0


async def _lateness_runs(
    args: argparse.Namespace,
    settings: Settings,
    mongo: PrivateMongo,
    smtp: CaptureServer,
    base: Path,
) -> dict[str, Any]:
    """Consecutive lateness runs, each on a fresh test server: their figures, and the
    p99s side by side.
    """
    runs = []
    for _ in range(args.lateness_runs):
        await asyncio.to_thread(mongo.restart)
        smtp.reset()
        runs.append(await _lateness(args, settings, smtp, base))
    return {
        "runs": runs,
        "from_due_p99_ms_by_run": [run["from_due_ms"]["p99"] for run in runs],
        "from_publish_p99_ms_by_run": [run["from_publish_ms"]["p99"] for run in runs],
    }


if __name__ == "__main__":
    sys.exit(main())
