"""Session-wide real parts: a private RabbitMQ, a SecantusDB server, an SMTP capture server.

Each test gets its own AMQP prefix and MongoDB database, so tests share the servers but
not their state. A part that cannot start fails the session; nothing is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel
from pydantic import SecretStr

from consumer.amqp import topology
from consumer.cli.app import _parser
from consumer.core.names import Names
from consumer.service.wiring import build_worker
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from consumer.vault import new_key
from deploy.devstack.mongo import PrivateMongo
from deploy.devstack.rabbitmq import PrivateRabbit
from deploy.devstack.smtp_capture import CaptureServer
from deploy.devstack.tls import self_signed, server_context
from tests.http_files import FileServer

# The watch over the run's output for the test secrets (see tests/secret_watch.py).
from tests.secret_watch import logs_under as logs_under
from tests.secret_watch import pytest_runtest_logreport as pytest_runtest_logreport
from tests.secret_watch import pytest_sessionfinish as pytest_sessionfinish
from tests.secret_watch import pytest_terminal_summary as pytest_terminal_summary
from tests.secret_watch import watched

# The fixtures that start a server; a test that uses none of them, and starts none of its
# own (marker ``stack``), is in the fast tier. The reliability scenarios never are.
SERVERS = frozenset({"rabbit", "mongo", "smtp_server"})
RELIABILITY = Path(__file__).parent / "reliability"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``fast`` every test that needs no server (``make test-fast`` runs them)."""
    for item in items:
        needs = set(getattr(item, "fixturenames", ())) & SERVERS
        if needs or RELIABILITY in item.path.parents or item.get_closest_marker("stack"):
            continue
        item.add_marker(pytest.mark.fast)


# Free space /dev/shm must have to hold the test brokers' data (a container's is often
# 64 MiB): below it, they write to the disk.
MEMORY_DIR_MIN_FREE = 4 * 1024**3


@pytest.fixture(scope="session")
def memory_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory in memory (tmpfs) for the test brokers' data, when the machine has room.

    Quorum queues sync each write to disk, which made declaring and publishing the suite's
    slowest steps; a broker killed and restarted finds its files in memory all the same.
    """
    shm = Path("/dev/shm")
    if not shm.is_dir() or shutil.disk_usage(shm).free < MEMORY_DIR_MIN_FREE:
        yield tmp_path_factory.mktemp("brokers")
        return
    with tempfile.TemporaryDirectory(prefix="mailbus-tests-", dir=shm) as directory:
        yield Path(directory)


@pytest.fixture
def memory_path(memory_dir: Path) -> Path:
    """A directory of the test's own in :func:`memory_dir`."""
    return Path(tempfile.mkdtemp(dir=memory_dir))


@pytest.fixture(scope="session")
def rabbit(memory_dir: Path) -> Iterator[PrivateRabbit]:
    """The session's RabbitMQ node (management plugin on)."""
    node = PrivateRabbit(memory_dir / "rabbitmq")
    node.start()
    yield node
    node.close()


@pytest.fixture
def own_rabbit(memory_path: Path) -> Iterator[PrivateRabbit]:
    """A RabbitMQ node of the test's own, for a test that kills or restarts it."""
    node = PrivateRabbit(memory_path / "rabbitmq")
    node.start()
    yield node
    node.close()


@pytest.fixture(scope="session")
def mongo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateMongo]:
    """The session's MongoDB-compatible server."""
    server = PrivateMongo(tmp_path_factory.mktemp("mongo"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[CaptureServer]:
    """The session's SMTP capture server."""
    server = CaptureServer()
    server.start()
    yield server
    server.stop()


# The one login the STARTTLS server below accepts; distinctive, so a leak would show.
SMTP_USER, SMTP_PASSWORD = "mailer", watched("pw-Kx7uQ2-correct-horse")


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[CaptureServer]:
    """An SMTP server that requires STARTTLS (self-signed certificate) and AUTH."""
    cert, key = self_signed(tmp_path)
    server = CaptureServer(tls=server_context(cert, key), logins={SMTP_USER: SMTP_PASSWORD})
    server.start()
    yield server
    server.stop()


@pytest.fixture
def smtp(smtp_server: CaptureServer) -> CaptureServer:
    """The capture server, emptied and without faults."""
    smtp_server.reset()
    return smtp_server


@pytest.fixture
def settings(rabbit: PrivateRabbit, mongo: PrivateMongo, smtp: CaptureServer) -> Settings:
    """Settings for one test: its own prefix and database, short retry delays."""
    tag = "t" + uuid.uuid4().hex[:10]
    return Settings(
        amqp_url=rabbit.amqp_url,
        mongo_url=mongo.url,
        mongo_db=tag,
        prefix=tag,
        default_smtp_url=smtp.url,
        retry_base_delay=0.2,
        retry_max_delay=1.0,
        smtp_timeout=5.0,
        drain_timeout=10.0,
        store_timeout=5.0,
        log_format="json",
        _env_file=None,
    )


@pytest.fixture
def keyed(settings: Settings) -> Settings:
    """The test's settings with a secret key for outbox passwords and no default outbox."""
    return settings.model_copy(
        update={"secret_key": SecretStr(watched(new_key())), "default_smtp_url": None}
    )


@pytest.fixture
async def channel(settings: Settings) -> AsyncIterator[AbstractChannel]:
    """A confirming channel on which the test's topology is declared."""
    names = Names(settings.prefix)
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    chan = await connection.channel(publisher_confirms=True)
    await topology.declare(chan, names, settings.delivery_limit)
    yield chan
    await connection.close()
    # Quorum queues are costly to keep: the session's broker would carry every test's ladder.
    # A new connection, as the test may have restarted the broker.
    async with await aio_pika.connect(settings.amqp_url.get_secret_value()) as cleanup:
        cleanup_channel = await cleanup.channel()
        for queue in names.queues():
            await cleanup_channel.queue_delete(queue)
        for exchange in names.exchanges():
            await cleanup_channel.exchange_delete(exchange)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[JobStore]:
    """The test's job store, indexes declared."""
    jobs = JobStore.connect(settings)
    await jobs.ensure_indexes()
    yield jobs
    await jobs.close()


async def settled_record(store: JobStore, job_id: str) -> dict[str, Any]:
    """The job's record once it says how the delivery ended: the "sent" record is
    written just after the SMTP server accepted the mail, so a test that saw the mail
    arrive may read the record a moment too early.
    """
    async with asyncio.timeout(10):
        while True:
            record = await store.get(job_id)
            if record is not None and record.get("status") != "sending":
                return record
            await asyncio.sleep(0.05)


async def cli(settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run ``mailbus ARGV`` in the test's loop; its standard output (exit status 0)."""
    capsys.readouterr()
    args = _parser().parse_args(list(argv))
    assert await args.handler(args, settings) == 0
    return capsys.readouterr().out


class RunningWorker:
    """A worker running in the test's event loop."""

    def __init__(self, settings: Settings) -> None:
        self.worker = build_worker(settings)
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.worker.run(self.stop))

    async def shutdown(self) -> None:
        """Drain and stop; re-raises anything the worker died of."""
        self.stop.set()
        async with asyncio.timeout(30):
            await self.task


@pytest.fixture
async def worker(settings: Settings, channel: AbstractChannel) -> AsyncIterator[RunningWorker]:
    """One in-process worker for the test's settings."""
    running = RunningWorker(settings)
    yield running
    if not running.task.done():
        await running.shutdown()
    with contextlib.suppress(asyncio.CancelledError):
        running.task.result()


@pytest.fixture
def files() -> Iterator[FileServer]:
    """A loopback HTTP server for URL attachments, its routes set by the test."""
    server = FileServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def repo_root() -> Path:
    """The repository checkout."""
    return Path(__file__).resolve().parent.parent
