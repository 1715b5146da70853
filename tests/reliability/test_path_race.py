"""A path attachment whose directory is swapped for a symlink to an outside directory
while the worker loads it: every load either reads the file inside or is refused, never
the file outside (the check and the open happen at different moments; the open walks
beneath the allowed directory without following any symlink).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest
from aio_pika.abc import AbstractChannel

from consumer.amqp.publish import job_message
from consumer.core.names import Names
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from deploy.devstack.smtp_capture import Captured, CaptureServer
from tests.broker import job
from tests.conftest import RunningWorker
from tests.reliability.accounts import Account, dead_ids, settle

JOBS = 400
INSIDE = b"the invoice inside the allowed directory\n"
OUTSIDE = b"OUTSIDE-SECRET: must never be attached\n"


class Swapper:
    """Swaps ``box`` for a symlink to ``outside`` and back, again and again, on a thread."""

    def __init__(self, box: Path, outside: Path) -> None:
        self.box, self.outside = box, outside
        self.aside = box.with_name(box.name + "-aside")
        self.swaps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            os.rename(self.box, self.aside)
            os.symlink(self.outside, self.box)
            os.unlink(self.box)
            os.rename(self.aside, self.box)
            self.swaps += 1
            time.sleep(0.0002)  # in place for a moment: loads succeed too

    def __enter__(self) -> Swapper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """An allowed directory holding box/invoice.pdf, and an outside directory whose
    invoice.pdf has the same name.
    """
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "box").mkdir(parents=True)
    outside.mkdir()
    (allowed / "box" / "invoice.pdf").write_bytes(INSIDE)
    (outside / "invoice.pdf").write_bytes(OUTSIDE)
    return allowed, allowed / "box"


def attached(mail: Captured) -> bytes:
    """The bytes of the mail's one attachment."""
    [part] = mail.message().iter_attachments()
    content = part.get_content()
    return content if isinstance(content, bytes) else content.encode()


@pytest.mark.timeout(120)
async def test_a_directory_swapped_for_a_symlink_never_leads_outside(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    store: JobStore,
    tree: tuple[Path, Path],
    tmp_path: Path,
    ledger: list[Account],
) -> None:
    allowed, box = tree
    names = Names(settings.prefix)
    exchange = await channel.get_exchange(names.exchange)
    ids = [f"race-{i:03}" for i in range(JOBS)]
    for job_id in ids:
        body = job(subject=job_id, attachments=[{"path": "box/invoice.pdf"}])
        await exchange.publish(job_message(body, job_id=job_id), routing_key="send")
    loading = settings.model_copy(update={"attachment_dirs": [allowed]})
    dead: dict[str, str] = {}
    with Swapper(box, tmp_path / "outside") as swapper:
        running = RunningWorker(loading)
        try:
            async with asyncio.timeout(90):
                while len(smtp.received()) + len(dead) < JOBS:
                    dead |= await dead_ids(channel, names)
                    await asyncio.sleep(0.2)
        finally:
            await running.shutdown()
    received = smtp.received()
    contents = [attached(mail) for mail in received]
    account = await settle("path swapped for a symlink", ids, received, dead, store)
    account.notes = {"outside_reads": contents.count(OUTSIDE), "swaps": swapper.swaps}
    ledger.append(account)
    assert account.notes["outside_reads"] == 0
    assert contents.count(INSIDE) == account.sent > 0
    assert (account.sent + account.dead, account.missing, account.duplicated) == (JOBS, [], 0)
    assert set(account.dead_reasons) <= {"attachment"}
