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

A send that does not conform now can *reserve* its slot: the earliest time it conforms is
taken as if it were sent then, so throttled jobs queue in order instead of racing for each
token. Times are integer microseconds since the epoch, so the arithmetic is exact;
intervals are rounded up, never allowing more than the limit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Grant:
    """The answer of one :func:`take`: the send's slot and whether it was taken.

    ``slot_us`` is the earliest time every limit allows the send; when ``granted``, the
    buckets now account for a send at that time. ``spacing_us`` is the shortest interval
    of the limits: a slot used later than that would crowd the next one.
    """

    granted: bool
    slot_us: int
    now_us: int
    spacing_us: int

    @property
    def wait(self) -> float:
        """Seconds from now until the slot (0 when it is now)."""
        return max(0, self.slot_us - self.now_us) / MICROS


def take(
    limits: Sequence[Limit],
    burst: int,
    tats: Sequence[int],
    now_us: int,
    max_wait_us: int,
) -> tuple[Grant, list[int]]:
    """Try to take one token from every bucket at ``now_us``.

    The send's slot is the earliest time at or after now when every limit allows it; it is
    taken when no later than ``max_wait_us`` from now (0: only a send right now; more: a
    reservation). Returns the grant and the buckets' new ``tats`` (unchanged if refused).
    """
    pairs = list(zip(limits, tats, strict=True))
    slot = max([now_us, *(tat - (burst - 1) * lim.interval_us for lim, tat in pairs)])
    spacing = min(lim.interval_us for lim in limits)
    if slot - now_us > max_wait_us:
        return Grant(False, slot, now_us, spacing), list(tats)
    moved = [max(tat, slot) + lim.interval_us for lim, tat in pairs]
    return Grant(True, slot, now_us, spacing), moved


@dataclass(frozen=True)
class Reservation:
    """A throttled job's slot: it sends through ``outbox`` once the server's clock says
    ``slot_us``, without taking another token, unless it is more than ``spacing_us`` late.
    """

    outbox: str
    provider: str
    slot_us: int
    spacing_us: int
