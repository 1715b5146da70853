"""Token-bucket arithmetic for provider limits, free of I/O.

A provider has one or more limits (``500/day``, ``20/minute``) and a burst ``B >= 1``, the
bucket's capacity. Each limit ``N/P`` is a token bucket kept as one number, its *theoretical
arrival time* (GCRA): a send conforms at ``t`` when ``tat - (B - 1) * interval <= t`` for
every limit, with ``interval = P / N``, and then moves each ``tat`` to
``max(tat, t) + interval``. Hence, for every limit:

- at most ``N + B - 1`` sends fall in any window of length ``P`` (``B = 1``: at most ``N``,
  a sliding-window cap like the old hourly cap);
- ``B`` sends may go back to back after a quiet spell;
- over a long run the rate is ``N / P``.

A job that finds no token does not race for the next one: it *queues*. A second set of
counters, shaped like the first, hands out wake-up slots one interval apart; the job waits
for its slot and then takes a real token like any other send, ahead of jobs that have not
queued. Tokens are only ever taken at the moment of sending, so a job that wakes late
never crowds the sends after it, and the caps hold at the server's clock whatever the
workers' clocks or delays. Times are integer microseconds since the epoch, so the
arithmetic is exact; intervals are rounded up, never allowing more than the limit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from consumer.errors import ConfigurationError

MICROS = 1_000_000
# Seconds per period, by every name ``--limit`` accepts.
PERIODS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hour": 3600,
    "d": 86400,
    "day": 86400,
}
_CANONICAL = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}
_LIMIT = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+?)s?\s*$")


@dataclass(frozen=True)
class Limit:
    """At most ``count`` sends per ``period`` seconds (plus the provider's burst, less one)."""

    count: int
    period: int

    @property
    def interval_us(self) -> int:
        """Microseconds between tokens, rounded up."""
        return math.ceil(self.period * MICROS / self.count)

    def __str__(self) -> str:
        name = _CANONICAL.get(self.period)
        return f"{self.count}/{name}" if name else f"{self.count}/{self.period}s"


def parse_limit(text: str) -> Limit:
    """Parse ``N/PERIOD``: ``500/day``, ``20/minute``, ``5/s``, ``99/hour``, ``10/30s``."""
    found = _LIMIT.match(text.lower())
    if found is None or found[3] not in PERIODS:
        raise ConfigurationError(
            f"a limit looks like 20/minute (periods: second, minute, hour, day), not {text!r}"
        )
    count, multiple, unit = int(found[1]), int(found[2] or 1), PERIODS[found[3]]
    if count < 1 or multiple < 1:
        raise ConfigurationError(f"a limit needs a positive count and period: {text!r}")
    return Limit(count, multiple * unit)


Mode = Literal["try", "enqueue", "queued"]


@dataclass(frozen=True)
class Bucket:
    """One limit's state: ``tat`` for tokens taken, ``queue`` for wake-up slots handed out
    (never behind ``tat``).
    """

    tat: int = 0
    queue: int = 0


@dataclass(frozen=True)
class Grant:
    """The answer of one :func:`take`.

    ``granted``: a token was taken now. Otherwise ``slot_us`` is when to come back: a new
    wake-up slot when ``queued`` (the job is now in the queue), else the next token.
    """

    granted: bool
    slot_us: int
    now_us: int
    queued: bool = False

    @property
    def wait(self) -> float:
        """Seconds from now until the slot (0 when it is now)."""
        return max(0, self.slot_us - self.now_us) / MICROS


def take(
    limits: Sequence[Limit],
    burst: int,
    buckets: Sequence[Bucket],
    now_us: int,
    mode: Mode,
) -> tuple[Grant, list[Bucket]]:
    """Take a token at ``now_us`` if every limit allows it, for a job that is new
    (``try``, ``enqueue``) or waking for its wake-up slot (``queued``).

    A new job may not pass jobs already queued: it is granted only while the queue is
    empty. Refused with ``enqueue``, it gets the next wake-up slot. Refused otherwise,
    nothing changes and the slot says when the next token comes.
    """
    pairs = list(zip(limits, buckets, strict=True))
    real = max([now_us, *(b.tat - (burst - 1) * lim.interval_us for lim, b in pairs)])
    queue = max([now_us, *(b.queue - (burst - 1) * lim.interval_us for lim, b in pairs)])
    if real <= now_us and (mode == "queued" or queue <= now_us):
        taken = []
        for lim, bucket in pairs:
            tat = max(bucket.tat, now_us) + lim.interval_us
            taken.append(Bucket(tat, max(bucket.queue, tat)))
        return Grant(True, now_us, now_us), taken
    if mode != "enqueue":
        return Grant(False, real if mode == "queued" else queue, now_us), list(buckets)
    queued = [Bucket(b.tat, max(b.queue, queue) + lim.interval_us) for lim, b in pairs]
    return Grant(False, queue, now_us, queued=True), queued


@dataclass(frozen=True)
class Reservation:
    """A queued job's place: it wakes at ``slot_us`` and takes ``provider``'s token for
    ``outbox`` ahead of jobs that have not queued.
    """

    outbox: str
    provider: str
    slot_us: int


def tokens_left(limit: Limit, burst: int, bucket: Bucket, now_us: int) -> int:
    """Sends ``limit`` would allow back to back at ``now_us``: from 0 to ``burst``."""
    spare = (now_us - bucket.tat) // limit.interval_us + burst
    return max(0, min(burst, spare))
