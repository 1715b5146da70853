"""AMQPS and MongoDB TLS: a worker and the CLI reach a broker and a store that speak only
TLS with a test CA's certificate, when their URLs name the CA file; without it both are
refused with OpenSSL's reason, and nothing is sent.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest
from pydantic import SecretStr

from consumer.amqp import topology
from consumer.amqp.publish import job_message
from consumer.core.names import Names
from consumer.errors import connection_failure
from consumer.settings import Settings
from consumer.store.jobs import JobStore
from deploy.devstack.mongo import PrivateMongo
from deploy.devstack.processes import mailbus, spawn_worker, stop_workers
from deploy.devstack.rabbitmq import PrivateRabbit
from deploy.devstack.smtp_capture import CaptureServer
from deploy.devstack.tls import ServerCertificate, signed_by_test_authority
from tests.broker import job
from tests.reliability.accounts import Account, dead_ids, settle, subjects
from tests.secret_watch import watched

JOBS = 30
BROKER_PASSWORD = watched("pw-Tq8vL3-amqps-broker")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> ServerCertificate:
    """A test CA and the servers' certificate it signed."""
    return signed_by_test_authority(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_rabbit(memory_dir: Path, certificate: ServerCertificate) -> Iterator[PrivateRabbit]:
    """A RabbitMQ node with an AMQPS listener."""
    node = PrivateRabbit(memory_dir / "rabbitmq-tls", password=BROKER_PASSWORD, tls=certificate)
    node.start()
    yield node
    node.close()


@pytest.fixture(scope="module")
def tls_mongo(
    tmp_path_factory: pytest.TempPathFactory, certificate: ServerCertificate
) -> Iterator[PrivateMongo]:
    """A SecantusDB server that speaks TLS only."""
    server = PrivateMongo(tmp_path_factory.mktemp("mongo-tls"), tls=certificate)
    server.start()
    yield server
    server.stop()


def over_tls(settings: Settings, rabbit: PrivateRabbit, mongo: PrivateMongo) -> Settings:
    """``settings`` with the TLS servers' URLs (which trust the test CA)."""
    return settings.model_copy(
        update={"amqp_url": SecretStr(rabbit.amqps_url), "mongo_url": SecretStr(mongo.url)}
    )


def test_a_tls_failure_is_named_without_the_drivers_text() -> None:
    refused = ssl.SSLCertVerificationError(
        1,
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed "
        "certificate in certificate chain (_ssl.c:1006)",
    )
    wrapped = ConnectionError("amqps://user:secret@host/ failed")
    wrapped.__cause__ = refused
    assert connection_failure(wrapped) == (
        "ConnectionError (TLS: certificate verify failed: self-signed certificate in "
        "certificate chain)"
    )
    assert connection_failure(ConnectionRefusedError("mongodb://u:secret@h/")) == (
        "ConnectionRefusedError"
    )


@pytest.mark.timeout(180)
async def test_worker_and_cli_over_amqps_and_mongodb_tls(
    settings: Settings,
    tls_rabbit: PrivateRabbit,
    tls_mongo: PrivateMongo,
    smtp: CaptureServer,
    tmp_path: Path,
    ledger: list[Account],
) -> None:
    settings = over_tls(settings, tls_rabbit, tls_mongo)
    names = Names(settings.prefix)
    bodies = {f"tls-{i:02d}": job(subject=f"tls-{i:02d}") for i in range(JOBS)}
    async with await aio_pika.connect(tls_rabbit.amqps_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare(channel, names, settings.delivery_limit)
        exchange = await channel.get_exchange(names.exchange)
        for job_id, body in bodies.items():
            await exchange.publish(job_message(body, job_id=job_id), routing_key="send")

    worker = spawn_worker(settings, tmp_path / "worker.log")
    try:
        async with asyncio.timeout(60):
            while len(subjects(smtp.received())) < JOBS:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        status = await mailbus(settings, "status", "--json")
    finally:
        await stop_workers(worker)

    assert status.returncode == 0, status.stderr
    assert '"sent"' in status.stdout
    store = JobStore.connect(settings)
    try:
        async with await aio_pika.connect(tls_rabbit.amqps_url) as connection:
            dead = await dead_ids(await connection.channel(), names)
        account = await settle("AMQPS and MongoDB TLS", list(bodies), smtp.received(), dead, store)
    finally:
        await store.close()
    ledger.append(account)
    assert (account.sent, account.dead, account.duplicated) == (JOBS, 0, 0), account


@pytest.mark.timeout(180)
async def test_servers_whose_ca_is_not_named_are_refused(
    settings: Settings,
    tls_rabbit: PrivateRabbit,
    tls_mongo: PrivateMongo,
    smtp: CaptureServer,
    tmp_path: Path,
) -> None:
    trusted = over_tls(settings, tls_rabbit, tls_mongo)
    names = Names(trusted.prefix)
    async with await aio_pika.connect(tls_rabbit.amqps_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare(channel, names, trusted.delivery_limit)
        exchange = await channel.get_exchange(names.exchange)
        await exchange.publish(job_message(job(subject="unsent"), job_id="unsent"), "send")
    amqps_without_ca = tls_rabbit.amqps_url.split("?")[0]
    mongo_without_ca = f"mongodb://127.0.0.1:{tls_mongo.port}/?tls=true"
    refused = "TLS: certificate verify failed"

    no_broker = trusted.model_copy(update={"amqp_url": SecretStr(amqps_without_ca)})
    status = await mailbus(no_broker, "status")
    assert status.returncode == 1
    assert "cannot reach RabbitMQ" in status.stderr
    assert refused in status.stderr
    assert BROKER_PASSWORD not in status.stderr

    no_store = trusted.model_copy(
        update={"mongo_url": SecretStr(mongo_without_ca), "store_timeout": 2.0}
    )
    status = await mailbus(no_store, "status")
    assert status.returncode == 1
    assert "cannot reach MongoDB" in status.stderr
    assert refused in status.stderr

    log = tmp_path / "worker.log"
    worker = spawn_worker(no_broker, log)
    try:
        async with asyncio.timeout(30):
            while "worker.broker_unreachable" not in log.read_text():  # noqa: ASYNC110
                await asyncio.sleep(0.2)
    finally:
        await stop_workers(worker)
    assert refused in log.read_text()
    assert BROKER_PASSWORD not in log.read_text()
    assert smtp.received() == []
