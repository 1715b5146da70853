"""MongoDB's clock as this worker reads it: its own clock plus an offset measured against the
server's ``hello.localTime``. Due times of scheduled and retried jobs are read on it, so
workers whose clocks disagree still agree on when a job is due: a job one worker put in
the delay ladder is not held back by another worker whose clock runs behind.

The offset is measured as NTP does, against the midpoint of the exchange, keeping the
sample with the shortest round trip; it is measured again every
:data:`REMEASURE_SECONDS`. Before the first measurement the offset is zero.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

SAMPLES = 3
REMEASURE_SECONDS = 60.0


def offset_from(sent: datetime, server: datetime, received: datetime) -> timedelta:
    """The server's clock minus ours, from one exchange: its reading against the midpoint
    of ours (the answer is taken to have spent half the round trip on the way back).
    """
    return server - (sent + (received - sent) / 2)


class StoreClock:
    """Now, on the store's clock."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        """The store's time now, as this worker estimates it."""
        return utcnow() + self.offset

    async def measure(self, read: Callable[[], Awaitable[datetime]]) -> timedelta:
        """Measure the offset with ``read`` (the server's time) and keep it."""
        samples = []
        for _ in range(SAMPLES):
            sent = utcnow()
            server = await read()
            received = utcnow()
            samples.append((received - sent, offset_from(sent, server, received)))
        self.offset = min(samples)[1]
        return self.offset


def utcnow() -> datetime:
    """The current time, timezone-aware (UTC)."""
    return datetime.now(UTC)
