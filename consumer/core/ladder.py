"""The delay ladder's arithmetic: routing keys, TTLs, bindings, and when to hold instead.

Level N (27..0) is a topic exchange and a quorum queue whose messages expire after 2^N s
and are dead-lettered to level N-1 (level 0: to the deliver exchange). The routing key
spells the remaining delay in binary, ``b27.b26.….b0.<destination>``: at level N a 1 in
bit N parks the message in that level's queue, a 0 passes it straight down. Every
function here is pure, so the walk is tested without a broker (consumer/README.md, "AMQP contract").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LEVELS = 28
TOP = LEVELS - 1
MAX_SECONDS = 2**LEVELS - 1
# Route this much earlier than due: each hop may be a few milliseconds late, and the worker
# holds the rest, so arriving early is precise while arriving late is not repairable.
MARGIN_SECONDS = 0.2


def level_ttl_ms(level: int) -> int:
    """Message TTL of the queue at ``level``: 2^level seconds, in milliseconds."""
    _check_level(level)
    return (1 << level) * 1000


def routing_key(seconds: int, destination: str) -> str:
    """The key that walks a message down the ladder for ``seconds`` then to ``destination``."""
    if not 0 <= seconds <= MAX_SECONDS:
        raise ValueError(f"a ladder delay is 0..{MAX_SECONDS} s, not {seconds}")
    bits = format(seconds, f"0{LEVELS}b")
    return ".".join((*bits, destination))


def _prefix(level: int) -> str:
    """The topic pattern words that skip the bits above ``level``."""
    return "*." * (TOP - level)


def parked_pattern(level: int) -> str:
    """Binding pattern from level ``level``'s exchange to its queue: bit ``level`` is 1."""
    _check_level(level)
    return f"{_prefix(level)}1.#"


def passed_pattern(level: int) -> str:
    """Binding pattern from level ``level``'s exchange to the next one down: bit is 0."""
    _check_level(level)
    return f"{_prefix(level)}0.#"


def deliver_pattern(destination: str) -> str:
    """Binding pattern from the deliver exchange to the queue of ``destination``."""
    return "*." * LEVELS + destination


@dataclass(frozen=True)
class Route:
    """Where a waiting job goes: ``ladder_seconds`` through the ladder, or held in memory."""

    ladder_seconds: int | None

    @property
    def hold(self) -> bool:
        """True when the wait is shorter than the ladder's one-second resolution."""
        return self.ladder_seconds is None


def route(remaining: float) -> Route:
    """How to wait ``remaining`` seconds: whole seconds (minus a margin) in the ladder,
    or, when less than a ladder second would be left, by holding the message.
    """
    seconds = math.floor(remaining - MARGIN_SECONDS)
    if seconds < 1:
        return Route(None)
    return Route(min(seconds, MAX_SECONDS))


def _check_level(level: int) -> None:
    if not 0 <= level <= TOP:
        raise ValueError(f"ladder levels are 0..{TOP}, not {level}")
