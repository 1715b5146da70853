"""Every producer example runs as its users would run it, against the real broker and a
running worker, and its mail arrives.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
from aio_pika.abc import AbstractChannel
from pydantic import SecretStr

from consumer.settings import Settings
from consumer.store.jobs import JobStore
from deploy.devstack.processes import run_with
from deploy.devstack.rabbitmq import PrivateRabbit
from deploy.devstack.smtp_capture import CaptureServer
from tests.conftest import RunningWorker, settled_record


async def run(settings: Settings, *command: str, cwd: Path | None = None) -> str:
    """Run an example with the test's MAILBUS_* environment; its stdout, stripped."""
    done = await run_with(settings, *command, cwd=cwd, kill_after=120)
    assert done.returncode == 0, f"{command}: {done.stderr}"
    return done.stdout.strip()


async def arrived(smtp: CaptureServer, subject: str) -> float:
    """Wait for the mail with ``subject``; when it arrived (``time.time``)."""
    async with asyncio.timeout(30):
        while True:
            for mail in smtp.received():
                if mail.message()["Subject"] == subject:
                    return mail.received_at
            await asyncio.sleep(0.05)


async def status_of(store: JobStore, job_id: str) -> str:
    """The status the job's record ends with, by the id the example printed."""
    return str((await settled_record(store, job_id))["status"])


@pytest.fixture
def examples(repo_root: Path) -> Path:
    return repo_root / "producer_examples"


@pytest.mark.parametrize(
    "script", ["publish_aio_pika.py", "publish_pika.py"], ids=["aio-pika", "pika"]
)
async def test_python_publishers(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    worker: RunningWorker,
    store: JobStore,
    examples: Path,
    script: str,
) -> None:
    path = str(examples / script)
    job_id = await run(settings, sys.executable, path, "--to", "a@example.org", "--subject", "now")
    await arrived(smtp, "now")
    [mail] = smtp.received()
    assert mail.rcpt_tos == ("a@example.org",)
    assert await status_of(store, job_id) == "sent"
    # The same id again is the same job: no second mail.
    await run(settings, sys.executable, path, "--to", "a@example.org", "--id", job_id)
    published = time.time()
    await run(
        settings,
        *(sys.executable, path, "--to", "b@example.org", "--subject", "later"),
        *("--delay-ms", "2000"),
    )
    assert await arrived(smtp, "later") - published >= 1.9
    assert len(smtp.received()) == 2


async def test_the_publish_helper(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    worker: RunningWorker,
    examples: Path,
) -> None:
    await run(
        settings, sys.executable, str(examples / "publish_with_helper.py"), "--to", "c@example.org"
    )
    await arrived(smtp, "Welcome")
    message = smtp.received()[0].message()
    assert message.get_content_type() == "multipart/alternative"


async def test_send_now_and_wait(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    worker: RunningWorker,
    examples: Path,
) -> None:
    script = str(examples / "send_now_and_wait.py")
    outcome = json.loads(await run(settings, sys.executable, script, "--to", "d@example.org"))
    assert (outcome["status"], outcome["smtp"]["code"]) == ("sent", 250)
    assert len(smtp.received()) == 1
    smtp.faults.refuse_rcpt("gone@example.org", "550 5.1.1 unknown")
    refused = await run_with(settings, sys.executable, script, "--to", "gone@example.org")
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["reason"] == "permanent"


async def test_node_publisher(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    worker: RunningWorker,
    store: JobStore,
    examples: Path,
    tmp_path: Path,
) -> None:
    project = tmp_path / "node"
    shutil.copytree(examples / "node", project)
    await run(settings, "npm", "install", "--no-audit", "--no-fund", "--silent", cwd=project)
    job_id = await run(
        settings, "node", "publish.js", "e@example.org", "From Node", "hi", cwd=project
    )
    await arrived(smtp, "From Node")
    assert await status_of(store, job_id) == "sent"
    published = time.time()
    await run(
        settings, "node", "publish.js", "e@example.org", "Node later", "hi", "2000", cwd=project
    )
    assert await arrived(smtp, "Node later") - published >= 1.9


async def test_php_publisher(
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    worker: RunningWorker,
    store: JobStore,
    examples: Path,
) -> None:
    script = str(examples / "php" / "publish.php")
    job_id = await run(settings, "php", script, "f@example.org", "From PHP", "Grüße")
    await arrived(smtp, "From PHP")
    assert await status_of(store, job_id) == "sent"
    assert smtp.received()[0].message().get_content().strip() == "Grüße"
    published = time.time()
    await run(settings, "php", script, "f@example.org", "PHP later", "x", "2000")
    assert await arrived(smtp, "PHP later") - published >= 1.9


async def test_shell_publishers(
    rabbit: PrivateRabbit,
    settings: Settings,
    channel: AbstractChannel,
    smtp: CaptureServer,
    worker: RunningWorker,
    examples: Path,
) -> None:
    await run(settings, str(examples / "shell" / "publish.sh"), "g@example.org", "By amqp-publish")
    await arrived(smtp, "By amqp-publish")
    api = rabbit.management_url.replace("http://", f"http://{rabbit.user}:{rabbit.password}@")
    with_api = settings.model_copy(update={"management_url": SecretStr(api)})
    await run(with_api, str(examples / "shell" / "publish_http.sh"), "h@example.org", "By curl")
    await arrived(smtp, "By curl")
    assert sorted(m.rcpt_tos[0] for m in smtp.received()) == ["g@example.org", "h@example.org"]
