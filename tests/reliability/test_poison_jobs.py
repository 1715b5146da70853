"""Poison jobs: input that once crashed the MIME build (and was redelivered for ever) or
made a worker hold a gigabyte. Each must end once, as a dead letter with its reason or a
mail with its file names cleaned, while a real worker process stays under 256 MiB, half
what the Kubernetes manifest gives it (the other half is for legitimate large mail).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractChannel

from consumer.amqp import dead_letters
from consumer.core.names import Names
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from consumer.store.templates import TemplateStore
from deploy.bench.process_stats import peak_rss
from deploy.devstack.processes import spawn_worker, stop_workers
from deploy.devstack.rabbitmq import MAX_MESSAGE_BYTES
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import depth, job, publish_raw
from tests.http_files import FileServer, Route
from tests.reliability.accounts import Account, settle

MiB = 2**20
# Half what the deploy/k8s worker is allowed.
MEMORY_LIMIT = 256 * MiB
# Each breaks a line for str.splitlines(), or (the surrogate) cannot be written at all.
POISON_CHARS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\ud800"]


async def dead_letters_by_job(channel: AbstractChannel, names: Names) -> list[tuple[str, str]]:
    """Every dead letter taken off the test's dead queue, as (job id, reason), duplicates kept."""
    queue = await channel.get_queue(names.dead, ensure=False)
    letters = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        letter = dead_letters.read(message)
        letters.append((letter.job_id or "?", letter.reason))
    return letters


async def test_poison_jobs_end_once_within_the_memory_limit(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    files: FileServer,
    tmp_path: Path,
    ledger: list[Account],
) -> None:
    allowed = tmp_path / "files"
    allowed.mkdir()
    (allowed / "one-mib.bin").write_bytes(b"\x5a" * MiB)
    (allowed / "re\x0bport\x1c.pdf").write_bytes(b"%PDF-1.4 disk")
    (allowed / "latest.pdf").symlink_to(allowed / "re\x0bport\x1c.pdf")
    settings = settings.model_copy(
        update={"attachment_dirs": [allowed], "attachment_allow_private": True}
    )
    names = Names(settings.prefix)
    templates = TemplateStore(store.database)
    await templates.put("poison-subject", "Hi {{ s }}", "text", None)
    await templates.put("growth", "growth", "{{ name * 400000000 }}", None)
    pdf = b"%PDF-1.4 served"
    cd_raw = 'attachment; filename="a\x85b.pdf"'
    cd_2231 = "attachment; filename*=UTF-8''x%E2%80%A8y%00.pdf"
    files.route("/files/re%0Bport%00.pdf", Route(body=pdf))
    files.route("/cd-raw", Route(body=pdf, disposition=cd_raw))
    files.route("/cd-2231", Route(body=pdf, disposition=cd_2231))

    jobs: dict[str, dict[str, Any]] = {}
    expected: dict[str, str] = {}  # job id -> dead-letter reason, or "sent:<file name>"
    for char in POISON_CHARS:
        tag = f"{ord(char):04x}"
        jobs[f"subject-{tag}"] = job(subject=f"a{char}b")
        jobs[f"header-{tag}"] = job(headers={"X-Note": f"a{char}b"})
        expected[f"subject-{tag}"] = expected[f"header-{tag}"] = "invalid"
    for char in ("\x0b", "\u2028"):
        name = f"template-subject-{ord(char):04x}"
        jobs[name] = job(text=None, template={"name": "poison-subject", "data": {"s": f"a{char}"}})
        expected[name] = "template"
    jobs["template-growth"] = job(text=None, template={"name": "growth", "data": {"name": "x"}})
    expected["template-growth"] = "template"
    for name, path, clean in (
        ("url-path", "/files/re%0Bport%00.pdf", "re_port_.pdf"),
        ("url-disposition", "/cd-raw", "a_b.pdf"),
        ("url-disposition-2231", "/cd-2231", "x_y_.pdf"),
    ):
        jobs[name] = job(attachments=[{"url": files.url(path)}])
        expected[name] = f"sent:{clean}"
    jobs["disk-name"] = job(attachments=[{"path": "latest.pdf"}])
    expected["disk-name"] = "sent:re_port_.pdf"
    jobs["long-path"] = job(attachments=[{"path": "a" * 300}])
    jobs["same-file-150"] = job(attachments=[{"path": "one-mib.bin"}] * 150)
    jobs["same-file-60"] = job(attachments=[{"path": "one-mib.bin"}] * 60)
    expected |= dict.fromkeys(("long-path", "same-file-150", "same-file-60"), "attachment")
    # As large as the broker takes: twice MAILBUS_MAX_JOB_BYTES.
    jobs["huge-body"] = job(text="x" * (MAX_MESSAGE_BYTES - 4096))
    expected["huge-body"] = "too_large"
    jobs["fine"] = job()
    expected["fine"] = "sent:"
    for job_id, body in jobs.items():
        body["subject"] = body["subject"] if job_id.startswith("subject-") else job_id
        # ensure_ascii: the lone surrogate travels as JSON spells it, "\ud800".
        await publish_raw(channel, names, json.dumps(body).encode(), message_id=job_id)

    worker = spawn_worker(settings, tmp_path / "worker.log")
    want_sent = sum(1 for e in expected.values() if e.startswith("sent:"))
    want_dead = len(expected) - want_sent
    try:
        async with asyncio.timeout(60):
            while len(smtp.received()) < want_sent or await depth(channel, names.dead) < want_dead:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # anything redelivered would show by now
        peak = peak_rss(worker.pid)
    finally:
        await stop_workers(worker)

    letters = await dead_letters_by_job(channel, names)
    times = Counter(job_id for job_id, _ in letters)
    dead = dict(letters)
    account = await settle("poison jobs", list(jobs), smtp.received(), dead, store)
    log = (tmp_path / "worker.log").read_text()
    account.notes = {"peak_rss_mib": round(peak / MiB, 1), "crashed": log.count("job.crashed")}
    ledger.append(account)

    assert account.settled, account.missing
    assert {k: n for k, n in times.items() if n != 1} == {}, "dead-lettered more than once"
    assert (account.sent, account.dead, account.duplicated) == (want_sent, want_dead, 0)
    assert dead == {k: v for k, v in expected.items() if not v.startswith("sent:")}
    assert account.dead_reasons == {"invalid": 18, "template": 3, "attachment": 3, "too_large": 1}
    assert "job.crashed" not in log
    names_sent = {
        str(mail.message()["Subject"]): [
            p.get_filename() for p in mail.message().iter_attachments()
        ]
        for mail in smtp.received()
    }
    for job_id, outcome in expected.items():
        if outcome.startswith("sent:"):
            assert names_sent[job_id] == ([outcome[5:]] if outcome[5:] else []), job_id
    # Jobs that reached a record did so once: one attempt each, none redelivered.
    for job_id in jobs:
        record = await store.get(job_id)
        assert record is None or record.get("attempts") == 1, (job_id, record)
    assert peak < MEMORY_LIMIT, f"the worker peaked at {peak / MiB:.0f} MiB"
