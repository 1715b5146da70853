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
queued. Tokens are taken at the moment of sending, or at most a short *horizon* ahead
for a slot the job then waits for in place; a job waking late from the queue takes
whatever token is next, so it never crowds the sends after it, and the caps hold at the
server's clock whatever the workers' clocks or delays. Several jobs may take a block of
tokens at once: the slots are those the same tokens taken one by one would have had.
Times are integer microseconds since the epoch, so the
arithmetic is exact; intervals are rounded up, never allowing more than the limit.

A provider answering that it is throttling (see :func:`consumer.core.retry.reply_verdict`)
is *slowed* for a while: every interval is :data:`SLOWDOWN` times as long, so its limits
allow half the rate, until the slowdown ends by itself. The burst's slack,
``(B - 1) * interval``, keeps its length in time: a slowdown that starts just after a
burst never lets more through at once than the bucket allowed before it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from consumer.errors import ConfigurationError

MICROS = 1_000_000
# How many times longer a slowed provider's intervals are: half its rate.
SLOWDOWN = 2
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

    ``granted``: a token was taken for ``slot_us``, now or moments later. Otherwise
    ``slot_us`` is when to come back: a new wake-up slot when ``queued`` (the job is now in
    the queue), else the next token.
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
    count: int = 1,
    horizon_us: int = 0,
    slowdown: int = 1,
) -> tuple[list[Grant], list[Bucket]]:
    """Take tokens for ``count`` jobs at ``now_us``, each due within ``horizon_us``, for
    jobs that are new (``try``, ``enqueue``) or waking for their wake-up slot (``queued``),
    every interval ``slowdown`` times as long.

    A granted token's ``slot_us`` is the moment it conforms: now, or up to the horizon
    later, the job then sending no earlier. A block of tokens is handed out as the same
    tokens taken one by one at their slots would be, so a block never exceeds a limit.
    New jobs may not pass jobs already queued: they are granted only while the queue is
    empty. Jobs refused with ``enqueue`` get the next wake-up slots; refused otherwise,
    nothing changes for them and the slot says when the next token comes.
    """
    intervals = [lim.interval_us * slowdown for lim in limits]
    spares = [(burst - 1) * lim.interval_us for lim in limits]
    tats = [b.tat for b in buckets]
    queues = [b.queue for b in buckets]

    def earliest(marks: Sequence[int]) -> int:
        return max([now_us, *(mark - spare for mark, spare in zip(marks, spares, strict=True))])

    grants: list[Grant] = []
    if mode == "queued" or earliest(queues) <= now_us:
        while len(grants) < count and (start := earliest(tats)) <= now_us + horizon_us:
            tats = [max(tat, start) + step for step, tat in zip(intervals, tats, strict=True)]
            queues = [max(queue, tat) for queue, tat in zip(queues, tats, strict=True)]
            grants.append(Grant(True, start, now_us))
    while len(grants) < count:
        if mode == "enqueue":
            slot = earliest(queues)
            queues = [max(q, slot) + step for step, q in zip(intervals, queues, strict=True)]
            grants.append(Grant(False, slot, now_us, queued=True))
        else:
            grants.append(Grant(False, earliest(tats if mode == "queued" else queues), now_us))
    return grants, [Bucket(tat, queue) for tat, queue in zip(tats, queues, strict=True)]


@dataclass(frozen=True)
class Reservation:
    """A queued job's place: it wakes at ``slot_us`` and takes ``provider``'s token for
    ``outbox`` ahead of jobs that have not queued.
    """

    outbox: str
    provider: str
    slot_us: int


def tokens_left(limit: Limit, burst: int, bucket: Bucket, now_us: int, slowdown: int = 1) -> int:
    """Sends ``limit`` would allow back to back at ``now_us``: from 0 to ``burst``."""
    slack = now_us - max(bucket.tat, now_us) + (burst - 1) * limit.interval_us
    spare = slack // (limit.interval_us * slowdown) + 1
    return max(0, min(burst, spare))
