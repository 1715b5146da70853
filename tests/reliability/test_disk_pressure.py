"""A full disk under the attachment spool: the write fails, the job waits for a retry,
and no temporary file is ever left behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
from pathlib import Path

from aio_pika.abc import AbstractChannel

from consumer.amqp.publish import job_message
from consumer.core.names import Names
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from deploy.devstack.processes import spawn_worker, stop_workers
from deploy.devstack.smtp_capture import CaptureServer
from tests.broker import job
from tests.http_files import FileServer, Route
from tests.reliability.accounts import Account, dead_ids, settle

JOBS = 5
FILE = os.urandom(2 * 1024 * 1024)


async def test_a_full_disk_is_a_transient_failure_and_leaks_nothing(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    files: FileServer,
    tmp_path: Path,
    ledger: list[Account],
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    # Retries at least 0.5 s apart: at the session's 0.2 s a job could spend all its
    # attempts within the 1.5 s the disk is full (seen: dead 'attempts_exhausted').
    settings = settings.model_copy(
        update={
            "attachment_tmp_dir": spool,
            "attachment_allow_private": True,
            "retry_base_delay": 0.5,
            "retry_max_delay": 2.0,
        }
    )
    names = Names(settings.prefix)
    url = files.route("/files/big.bin", Route(body=FILE, content_type="application/octet-stream"))
    worker = spawn_worker(settings, tmp_path / "worker.log")
    try:
        # No file the worker writes may grow past 512 KiB: the 2 MiB download cannot be
        # spooled (EFBIG), as on a disk that is full.
        unlimited = resource.RLIM_INFINITY
        resource.prlimit(worker.pid, resource.RLIMIT_FSIZE, (512 * 1024, unlimited))
        exchange = await channel.get_exchange(names.exchange)
        ids = [f"disk-{i}" for i in range(JOBS)]
        for job_id in ids:
            body = job(subject=job_id, attachments=[{"url": url, "filename": "big.bin"}])
            await exchange.publish(job_message(body, job_id=job_id), routing_key="send")
        await asyncio.sleep(1.5)
        assert smtp.received() == []
        assert files.hits, "the worker never tried to fetch"
        assert list(spool.iterdir()) == []
        # Space again: the retries go through.
        resource.prlimit(worker.pid, resource.RLIMIT_FSIZE, (unlimited, unlimited))
        async with asyncio.timeout(60):
            await smtp.wait_for(JOBS)
    finally:
        await stop_workers(worker)
    log = (tmp_path / "worker.log").read_text()
    account = await settle(
        "attachment spool on a full disk", ids, smtp.received(),
        await dead_ids(channel, names), store,
    )  # fmt: skip
    account.notes = {"fetches": len(files.hits)}
    ledger.append(account)
    assert (account.sent, account.dead, account.duplicated) == (JOBS, 0, 0)
    assert "cannot spool the download" in log
    assert list(spool.iterdir()) == []
    for mail in smtp.received():
        [part] = list(mail.message().iter_attachments())
        data = part.get_content()
        assert hashlib.sha256(data).digest() == hashlib.sha256(FILE).digest()
