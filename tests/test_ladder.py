"""The delay ladder's arithmetic, and a walk through the very bindings and queue arguments
that ``topology.declare`` gives the broker, simulated with AMQP topic matching.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.core import ladder
from consumer.core.headers import DELAY_HEADER, DUE_HEADER
from consumer.core.names import DUE_KEY, SEND_KEY, SEND_NOW_KEY, Names, ladder_queue_arguments
from consumer.core.schedule import carried_headers, to_epoch_ms

NAMES = Names("mb")
# The queues at the ladder's foot, by the key that routes there.
DESTINATIONS = {
    NAMES.send_queue: SEND_KEY,
    NAMES.send_now_queue: SEND_NOW_KEY,
    NAMES.due_queue: DUE_KEY,
}


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` zero or more."""

    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        if not k:
            return False
        return (p[0] == "*" or p[0] == k[0]) and match(p[1:], k[1:])

    return match(pattern.split("."), key.split("."))


def walk(key: str) -> tuple[int, str]:
    """Follow ``key`` from the top exchange to a send queue: (total TTL in ms, queue)."""
    exchange = NAMES.delay(ladder.TOP)
    total_ms = 0
    while exchange != NAMES.deliver:
        level = int(exchange.rsplit(".", 1)[1])
        parked = topic_matches(ladder.parked_pattern(level), key)
        passed = topic_matches(ladder.passed_pattern(level), key)
        assert parked != passed, f"level {level} must route {key} exactly one way"
        if parked:
            arguments = ladder_queue_arguments(NAMES, level)
            total_ms += arguments["x-message-ttl"]
            exchange = arguments["x-dead-letter-exchange"]
        else:
            exchange = NAMES.delay(level - 1) if level > 0 else NAMES.deliver
    queues = [q for q, d in DESTINATIONS.items() if topic_matches(ladder.deliver_pattern(d), key)]
    assert len(queues) == 1, f"{key} must reach exactly one send queue"
    return total_ms, queues[0]


@given(st.integers(0, ladder.MAX_SECONDS), st.sampled_from(sorted(DESTINATIONS)))
def test_every_delay_walks_a_path_whose_ttls_sum_to_it(seconds: int, queue: str) -> None:
    assert walk(ladder.routing_key(seconds, DESTINATIONS[queue])) == (seconds * 1000, queue)


@pytest.mark.parametrize("seconds", [0, 1, 2, 3, 90, 86_400, ladder.MAX_SECONDS])
def test_edges_of_the_ladder(seconds: int) -> None:
    assert walk(ladder.routing_key(seconds, SEND_KEY)) == (seconds * 1000, NAMES.send_queue)


def test_routing_key_spells_the_delay_in_binary() -> None:
    key = ladder.routing_key(5, "send.now")
    assert key == "0." * 25 + "1.0.1.send.now"
    with pytest.raises(ValueError, match="ladder delay"):
        ladder.routing_key(ladder.MAX_SECONDS + 1, SEND_KEY)
    with pytest.raises(ValueError, match="ladder delay"):
        ladder.routing_key(-1, SEND_KEY)


def test_levels_dead_letter_one_level_down_and_expire_after_two_to_the_n_seconds() -> None:
    assert ladder_queue_arguments(NAMES, 0)["x-dead-letter-exchange"] == "mb.deliver"
    top = ladder_queue_arguments(NAMES, ladder.TOP)
    assert top["x-dead-letter-exchange"] == "mb.delay.26"
    assert top["x-message-ttl"] == 2**27 * 1000
    assert top["x-dead-letter-strategy"] == "at-least-once"
    with pytest.raises(ValueError, match="levels"):
        ladder.level_ttl_ms(ladder.LEVELS)


@pytest.mark.parametrize(
    ("remaining", "expected"),
    [
        (-3.0, None),
        (0.0, None),
        (0.9, None),
        (1.1, None),  # a ladder second would leave less than the margin: hold
        (1.25, 1),
        (3.0, 2),  # arrive early by up to a second plus the margin, then hold the rest
        (90.0, 89),
        (90.5, 90),
        (10.0 * ladder.MAX_SECONDS, ladder.MAX_SECONDS),  # longer: another pass later
    ],
)
def test_route_sends_whole_seconds_through_the_ladder_and_holds_the_rest(
    remaining: float, expected: int | None
) -> None:
    route = ladder.route(remaining)
    assert route.ladder_seconds == expected
    assert route.hold is (expected is None)


@given(st.floats(0, 1e9, allow_nan=False))
def test_route_never_arrives_late_and_never_holds_long(remaining: float) -> None:
    route = ladder.route(remaining)
    if route.ladder_seconds is None:
        assert remaining < 1 + ladder.MARGIN_SECONDS
    else:
        assert route.ladder_seconds <= remaining - ladder.MARGIN_SECONDS
        if route.ladder_seconds < ladder.MAX_SECONDS:
            assert remaining - route.ladder_seconds < 1 + ladder.MARGIN_SECONDS


def test_carried_headers_make_the_due_time_absolute_and_drop_broker_headers() -> None:
    due = datetime(2030, 1, 1, tzinfo=UTC) + timedelta(milliseconds=250)
    headers = {
        DELAY_HEADER: 90_000,
        "x-death": [{"count": 1}],
        "x-first-death-reason": "expired",
        "x-delivery-count": 2,
        "x-app": "kept",
    }
    assert carried_headers(headers, due) == {"x-app": "kept", DUE_HEADER: to_epoch_ms(due)}
