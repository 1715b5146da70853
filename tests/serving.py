"""The compatibility gateways served in the test's event loop, as `mailbus gateway serve`
serves them, on the addresses a test asks for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator

from consumer.service.gateway import Listen, serve
from consumer.settings import Settings
from deploy.devstack.processes import settings_env

ANY_PORT = Listen("127.0.0.1", 0)


@contextlib.asynccontextmanager
async def gateways(
    settings: Settings,
    *,
    rest: Listen | None = None,
    daemon: Listen | None = None,
    smtp: Listen | None = None,
    smtps: Listen | None = None,
    bounces: Listen | None = None,
) -> AsyncIterator[dict[str, int]]:
    """Serve until the block ends, then stop as on SIGTERM; yields the ports bound, by
    gateway name. A gateway that cannot start raises what stopped it.
    """
    stop = asyncio.Event()
    started: asyncio.Future[dict[str, int]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve(
            settings,
            stop,
            rest=rest,
            daemon=daemon,
            smtp=smtp,
            smtps=smtps,
            bounces=bounces,
            started=started,
        )
    )
    async with asyncio.timeout(20):
        await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        await task  # raises why it stopped
        raise AssertionError("the gateways stopped before they listened")
    try:
        yield started.result()
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await task


@contextlib.asynccontextmanager
async def gateway_command(
    settings: Settings, *listens: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, list[str]]]:
    """``mailbus gateway serve LISTENS...`` (``--daemon 127.0.0.1:0``, ...) as a process;
    yields it and the lines announcing where each gateway listens. SIGTERM ends it, and it
    must then exit 0.
    """
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "consumer", "--env-file", os.devnull, "gateway", "serve"),
        *listens,
        env=settings_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            lines = [(await process.stdout.readline()).decode().strip() for _ in listens[1::2]]
        yield process, lines
    finally:
        process.terminate()
        async with asyncio.timeout(30):
            assert await process.wait() == 0


def announced_port(line: str) -> int:
    """The port in a gateway's announcement (``daemon gateway: tcp://127.0.0.1:PORT``)."""
    return int(line.rsplit(":", 1)[1].split("/", 1)[0].split(" ", 1)[0])
