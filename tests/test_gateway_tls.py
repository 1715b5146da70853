"""The daemon gateway over TLS (the old daemon's ``ssl://``): a TLS client is answered, a
client that never completes a handshake is let go without stopping the listener, and a
certificate or key that cannot be used stops the gateway at start.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aio_pika.abc import AbstractChannel
from pydantic import SecretStr

from consumer.errors import ConfigurationError
from consumer.service.gateway import Listen, serve
from consumer.settings import Settings
from consumer.store.domains import hash_key
from deploy.devstack.processes import mailbus
from deploy.devstack.tls import self_signed
from tests.serving import ANY_PORT, announced_port, gateway_command, gateways

PASSWORD = "tls password"
PONG = {"status": "success", "data": None, "message": "pong"}


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    """The test's settings with the daemon gateway on TLS (a self-signed certificate)."""
    cert, key = self_signed(tmp_path)
    return settings.model_copy(
        update={
            "gateway_password_hash": SecretStr(hash_key(PASSWORD)),
            "gateway_domain": "daemon.example",
            "gateway_header_timeout": 1.0,
            "gateway_read_timeout": 2.0,
            "gateway_tls_cert": cert,
            "gateway_tls_key": key,
        }
    )


@pytest.fixture
async def port(settings: Settings, channel: AbstractChannel) -> AsyncIterator[int]:
    """The daemon gateway serving TLS on a free loopback port."""
    async with gateways(settings, daemon=ANY_PORT) as bound:
        yield bound["daemon"]


def client_context(settings: Settings) -> ssl.SSLContext:
    """A client's TLS context trusting the gateway's self-signed certificate."""
    assert settings.gateway_tls_cert is not None
    return ssl.create_default_context(cafile=settings.gateway_tls_cert)


async def tls_ping(settings: Settings, port: int) -> dict[str, Any]:
    """A ``ping`` over TLS, without a newline as the old clients sent it; the answer."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_context(settings), server_hostname="127.0.0.1"
    )
    try:
        writer.write(json.dumps({"ping": None, "auth": PASSWORD}).encode())
        await writer.drain()
        async with asyncio.timeout(10):
            answer: dict[str, Any] = json.loads(await reader.read())
    finally:
        writer.close()
    return answer


async def plain_client(port: int, request: bytes) -> bytes:
    """What a plain-text client sending ``request`` reads before the gateway closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def test_a_tls_client_is_answered(settings: Settings, port: int) -> None:
    assert await tls_ping(settings, port) == PONG


async def test_clients_without_a_handshake_are_let_go_and_tls_ones_still_served(
    settings: Settings, port: int
) -> None:
    speaking = plain_client(port, json.dumps({"ping": None, "auth": PASSWORD}).encode())
    silent = plain_client(port, b"")
    started = asyncio.get_running_loop().time()
    assert await asyncio.gather(speaking, silent) == [b"", b""]
    # The silent one went at the handshake timeout, not at the test's own.
    assert asyncio.get_running_loop().time() - started < settings.gateway_header_timeout + 3
    assert await tls_ping(settings, port) == PONG


async def test_a_missing_key_or_half_the_pair_is_refused_at_start(
    settings: Settings, tmp_path: Path
) -> None:
    missing = tmp_path / "absent.key"
    stop = asyncio.Event()
    daemon = Listen("127.0.0.1", 0)
    with pytest.raises(ConfigurationError, match=f"MAILBUS_GATEWAY_TLS_KEY: cannot read {missing}"):
        await serve(
            settings.model_copy(update={"gateway_tls_key": missing}), stop, rest=None, daemon=daemon
        )
    half = settings.model_copy(update={"gateway_tls_key": None})
    with pytest.raises(
        ConfigurationError, match="MAILBUS_GATEWAY_TLS_CERT and MAILBUS_GATEWAY_TLS_KEY go together"
    ):
        await serve(half, stop, rest=None, daemon=daemon)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(ConfigurationError, match=f"MAILBUS_GATEWAY_TLS_CERT \\({not_pem}\\)"):
        await serve(
            settings.model_copy(update={"gateway_tls_cert": not_pem}),
            stop,
            rest=None,
            daemon=daemon,
        )


async def test_the_command_announces_tls_and_its_help_names_the_settings(
    settings: Settings, channel: AbstractChannel
) -> None:
    helped = await mailbus(settings, "gateway", "serve", "--help")
    assert "MAILBUS_GATEWAY_TLS_CERT" in helped.stdout
    assert "MAILBUS_GATEWAY_TLS_KEY" in helped.stdout
    async with gateway_command(settings, "--daemon", "127.0.0.1:0") as (_, [line]):
        assert line.startswith("daemon gateway: tls://127.0.0.1:"), line
        assert await tls_ping(settings, announced_port(line)) == PONG
