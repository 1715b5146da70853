"""Who a network server lets in, and for how much: a bounded set of connections, the
client addresses that have proved who they are, and a limit on failed authentications.

Shared by the HTTP endpoints (threads) and the gateways (one event loop), hence the locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Hashable
from typing import Generic, TypeVar

C = TypeVar("C", bound=Hashable)
# Addresses remembered, so that a flood of addresses cannot grow the tables without end.
MAX_ADDRESSES = 10_000


class ConnectionSlots(Generic[C]):
    """At most ``limit`` open connections. When all are taken, the one that has waited the
    longest for its request is let go to make room: it is the likeliest to be idle or
    dripping, and a client that sends its request at once is never the oldest for long.
    Only when every connection is being answered is a new one refused.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._reading: OrderedDict[C, Callable[[], None]] = OrderedDict()
        self._answering: set[C] = set()
        self._lock = threading.Lock()

    def admit(self, connection: C, drop: Callable[[], None]) -> bool:
        """Take a slot for ``connection`` (``drop`` closes it if it must make room later);
        False when every slot is busy answering.
        """
        with self._lock:
            evicted = None
            if len(self._reading) + len(self._answering) >= self.limit:
                if not self._reading:
                    return False
                _, evicted = self._reading.popitem(last=False)
            self._reading[connection] = drop
        if evicted is not None:
            evicted()
        return True

    def answering(self, connection: C) -> None:
        """``connection``'s request is read: it may no longer be let go to make room."""
        with self._lock:
            if self._reading.pop(connection, None) is not None:
                self._answering.add(connection)

    def waiting(self, connection: C, drop: Callable[[], None]) -> None:
        """``connection`` was answered and waits for its next request (a session that
        stays open): it may be let go to make room again.
        """
        with self._lock:
            if connection in self._answering:
                self._answering.discard(connection)
                self._reading[connection] = drop

    def release(self, connection: C) -> None:
        """``connection`` is closed: its slot is free (a no-op for one never admitted)."""
        with self._lock:
            self._reading.pop(connection, None)
            self._answering.discard(connection)

    def __len__(self) -> int:
        with self._lock:
            return len(self._reading) + len(self._answering)


class FailedLogins:
    """Failed authentications by client address, over a sliding window: after ``limit`` of
    them within ``window`` seconds an address is refused without its key being hashed
    (each hash is a deliberately slow scrypt).
    """

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()
        # Per address: its lock and how many requests hold or wait for it.
        self._turns: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def turn(self, address: str) -> AsyncIterator[None]:
        """One authentication at a time for ``address`` (on one event loop), so that a
        burst of guesses sent at once is counted guess by guess and no more than
        ``limit`` are hashed. A key already verified takes its turn in a moment.
        """
        lock, users = self._turns.get(address, (asyncio.Lock(), 0))
        self._turns[address] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._turns[address]
            if users == 1:
                del self._turns[address]
            else:
                self._turns[address] = (lock, users - 1)

    def blocked(self, address: str) -> bool:
        """Whether ``address`` has failed too often lately."""
        now = time.monotonic()
        with self._lock:
            times = self._failures.get(address)
            if times is None:
                return False
            while times and times[0] <= now - self.window:
                times.popleft()
            if not times:
                del self._failures[address]
                return False
            return len(times) >= self.limit

    def failed(self, address: str) -> None:
        """Count one failed authentication from ``address``."""
        with self._lock:
            times = self._failures.pop(address, None) or deque(maxlen=self.limit)
            times.append(time.monotonic())
            self._failures[address] = times  # the most recent last
            if len(self._failures) > MAX_ADDRESSES:
                self._failures.popitem(last=False)


class TrustedAddresses:
    """Client addresses a request has authenticated from (the most recent
    ``MAX_ADDRESSES``): they may send requests up to the full size limit.
    """

    def __init__(self) -> None:
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, address: str) -> None:
        """Remember that a request from ``address`` authenticated."""
        with self._lock:
            self._seen.pop(address, None)
            self._seen[address] = None
            if len(self._seen) > MAX_ADDRESSES:
                self._seen.popitem(last=False)

    def __contains__(self, address: object) -> bool:
        with self._lock:
            return address in self._seen
