"""Each test's AMQP topology, declared before the test asks for it and deleted after it.

A prefix's topology is 33 quorum queues, 32 exchanges and their bindings: about 0.3 s of
the broker's time to declare and 0.2 s to delete. A thread of its own does both beside
the running tests, so an integration test starts with its topology in place (the
``channel`` fixture declares it again, which costs a few round trips) and ends without
waiting for the deletes. The topology is the one :func:`consumer.amqp.topology.declare`
makes, as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import uuid

import aio_pika
from aio_pika.abc import AbstractConnection

from consumer.amqp import topology
from consumer.core.names import Names

# This thread's own pause, bound once: a test may replace asyncio.sleep for its own loop
# (to count a backoff's pauses), and must not see this thread's calls.
_pause = asyncio.sleep
# Topologies kept declared ahead: one, as tests take them one at a time.
AHEAD = 1
# How long a test waits for the one ahead before declaring its own (the broker may be
# restarting under another test).
TAKE_WAIT = 5.0


def new_prefix() -> str:
    """A prefix no other test uses (it names the test's MongoDB database too)."""
    return "t" + uuid.uuid4().hex[:10]


class Topologies:
    """Declares prefixes' topologies ahead and deletes discarded ones, in a thread."""

    def __init__(self, amqp_url: str, delivery_limit: int) -> None:
        self._url = amqp_url
        self._delivery_limit = delivery_limit
        self._ready: queue.Queue[str] = queue.Queue()
        self._discarded: queue.Queue[str] = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-topologies", daemon=True)

    def start(self) -> None:
        """Start declaring ahead."""
        self._thread.start()

    def stop(self) -> None:
        """Stop; deletes not done yet are left to the broker's end with the session."""
        self._stopping.set()
        self._thread.join(timeout=30)

    def take(self) -> str:
        """A new prefix, its topology declared if the thread had one ready in time."""
        try:
            return self._ready.get(timeout=TAKE_WAIT)
        except queue.Empty:
            return new_prefix()

    def discard(self, prefix: str) -> None:
        """Delete ``prefix``'s queues and exchanges, soon."""
        self._discarded.put(prefix)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        connection: AbstractConnection | None = None
        while not self._stopping.is_set():
            try:
                if connection is None:
                    # No heartbeats: their task would call asyncio.sleep (see _pause).
                    connection = await aio_pika.connect(self._url, heartbeat=0)
                if not await self._work(connection):
                    await _pause(0.02)
            except Exception:  # the broker restarting under a test: connect again later
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await connection.close()
                connection = None
                await _pause(0.5)
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    async def _work(self, connection: AbstractConnection) -> bool:
        """Do one delete or one declare; False when there was nothing to do."""
        try:
            prefix = self._discarded.get_nowait()
        except queue.Empty:
            prefix = None
        if prefix is not None:
            names = Names(prefix)
            try:
                async with connection.channel() as channel:
                    for queue_name in names.queues():
                        await channel.queue_delete(queue_name)
                    for exchange in names.exchanges():
                        await channel.exchange_delete(exchange)
            except Exception:
                self._discarded.put(prefix)
                raise
            return True
        if self._ready.qsize() < AHEAD:
            prefix = new_prefix()
            try:
                async with connection.channel() as channel:
                    await topology.declare(channel, Names(prefix), self._delivery_limit)
            except Exception:
                self._discarded.put(prefix)  # what part of it was declared
                raise
            self._ready.put(prefix)
            return True
        return False
