"""What a run's figures say: the CPU each part of the stack spends per mail and the rate
each would allow alone (``scale_out``), and each performance target beside what was
measured, met or not, and for one missed what bounds it (``targets``), in the same JSON.
"""

from __future__ import annotations

import os
from typing import Any

# The performance targets of the design notes ("Performance"): name, limit, and whether
# the measure must stay at or below it ("max") or reach it ("min").
WORKER_CPU_MS = 0.85
TEST_SERVER_CPU_MS = 1.0
PEER_RATIO = 1.2
LATENESS_P99_MS = 250.0
UTILIZATION = 0.95
SOAK_RSS_MB = 120.0
# Worker counts the projection is made for.
PROJECTED_WORKERS = (1, 2, 4, 8, 16)


def _per_mail(run: dict[str, Any]) -> dict[str, float]:
    """CPU milliseconds per mail of each part in ``run``: the worker processes together
    and each server (RabbitMQ, the MongoDB test server, the SMTP sink).
    """
    return {"worker": run["cpu_seconds_per_1000_mails"], **run["server_cpu_seconds_per_1000_mails"]}


def scale_out(one: dict[str, Any], cores: int | None = None) -> dict[str, Any]:
    """From one worker's run: each part's CPU per mail and the rate it would allow alone on
    a core of its own, what this machine's cores allow with all of them sharing it, and
    the projection for N workers each on a core of its own against a broker and a
    database on machines of their own (the test server stands in for MongoDB, single
    threaded as it is, so its alone rate bounds every projection made with it).
    """
    cores = cores or os.cpu_count() or 1
    per_mail = _per_mail(one)
    alone = {role: round(1000 / ms) if ms > 0 else None for role, ms in per_mail.items()}
    total = sum(per_mail.values())
    machine = round(cores * 1000 / total)
    servers = {role: rate for role, rate in alone.items() if role != "worker" and rate}
    worker = alone["worker"] or 0
    projected = {}
    for workers in PROJECTED_WORKERS:
        rate = workers * worker
        bound = "workers"
        for role, limit in servers.items():
            if limit < rate:
                rate, bound = limit, role
        projected[str(workers)] = {"mails_per_second": rate, "bounded_by": bound}
    biggest = max((r for r in per_mail if r != "worker"), key=lambda r: per_mail[r])
    measured = one["mails_per_second"]
    return {
        "cpu_ms_per_mail": per_mail,
        "alone_mails_per_second": alone,
        "machine_cores": cores,
        "machine_mails_per_second": machine,
        "measured_share_of_machine": round(measured / machine, 3),
        "bounded_by": (
            f"this machine's {cores} cores, shared: the worker, {biggest} and the rest spend"
            f" {total:.2f} ms of CPU a mail together, {machine} mails/s at most"
        ),
        "projection": projected,
        "projection_assumes": (
            "each worker on a core of its own; RabbitMQ and the MongoDB test server each"
            " on a core of their own at the CPU per mail measured here (the test server"
            " is the bound: a real MongoDB spends far less a write)"
        ),
    }


def _target(
    name: str, measured: Any, limit: float, kind: str, bound: str, met: bool | None = None
) -> dict[str, Any]:
    if met is None:
        met = measured <= limit if kind == "max" else measured >= limit
    entry = {"target": name, "measured": measured, kind: limit, "met": met}
    if not met:
        entry["bounded_by"] = bound
    return entry


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target a run measured, beside its figure; what bounds the ones missed."""
    found: list[dict[str, Any]] = []
    one, peer = results.get("one_worker"), results.get("celery_peer")
    scale = results.get("scale_out")
    if one is not None and scale is not None:
        per_mail = scale["cpu_ms_per_mail"]
        found.append(
            _target(
                "worker CPU ms per mail (one worker, 2 KB mail)",
                per_mail["worker"],
                WORKER_CPU_MS,
                "max",
                "per-mail costs spread over the AMQP, MongoDB and SMTP clients, the email"
                " package and the event loop (profile: deploy/bench/README.md)",
            )
        )
        found.append(
            _target(
                "MongoDB test server CPU ms per mail",
                per_mail.get("mongodb"),
                TEST_SERVER_CPU_MS,
                "max",
                "the test server's own cost per write statement (two a mail: the claim's"
                " insert and the sent record's update), most of it planning each update",
            )
        )
    if one is not None and peer is not None:
        found.append(
            _target(
                "mails per second over the Celery peer's",
                one.get("ratio_to_celery_peer"),
                PEER_RATIO,
                "min",
                scale["bounded_by"] if scale else "the machine's cores",
            )
        )
    limit = results.get("rate_limit")
    if limit is not None:
        lag = limit["arrival_after_token_ms"]
        found.append(
            _target(
                "most mails at the SMTP server in any 1 s window (4 workers, 50/s)",
                limit["max_in_any_1s_window"],
                limit["allowed_in_any_1s_window"],
                "max",
                f"the tokens held the cap ({limit['max_tokens_in_any_1s_window']} in the"
                " busiest second on MongoDB's clock); the mails reached the sink"
                f" {lag['p50']} ms after their tokens at p50, {lag['p99']} at p99 and"
                f" {lag['max']} at most, a spread that bunches them on a saturated machine",
            )
        )
        found.append(
            _target(
                "utilization of the rate limit",
                limit["utilization"],
                UTILIZATION,
                "min",
                "jobs queued past the in-place wait come back through the delay ladder,"
                " each needing its claim and token from the database taking new jobs",
            )
        )
    late = results.get("lateness")
    if late is not None:
        p99s = [run["from_due_ms"]["p99"] for run in late.get("runs", [late])]
        found.append(
            _target(
                "scheduled mail p99 ms from due, in every run",
                p99s,
                LATENESS_P99_MS,
                "max",
                "a due job's claim waits behind the database's other writes at that moment",
                met=all(p <= LATENESS_P99_MS for p in p99s),
            )
        )
    soak = results.get("soak")
    if soak is not None:
        found.append(
            _target(
                "RSS MB after the soak",
                soak["rss_mb_after_last_round"],
                SOAK_RSS_MB,
                "max",
                "the worker's memory",
            )
        )
    return found
