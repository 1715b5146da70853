"""The compatibility gateways served in the test's event loop, as `mailbus gateway serve`
serves them, on the addresses a test asks for.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from consumer.service.gateway import Listen, serve
from consumer.settings import Settings

ANY_PORT = Listen("127.0.0.1", 0)


@contextlib.asynccontextmanager
async def gateways(
    settings: Settings,
    *,
    rest: Listen | None = None,
    daemon: Listen | None = None,
    smtp: Listen | None = None,
    smtps: Listen | None = None,
) -> AsyncIterator[dict[str, int]]:
    """Serve until the block ends, then stop as on SIGTERM; yields the ports bound, by
    gateway name. A gateway that cannot start raises what stopped it.
    """
    stop = asyncio.Event()
    started: asyncio.Future[dict[str, int]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve(settings, stop, rest=rest, daemon=daemon, smtp=smtp, smtps=smtps, started=started)
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
