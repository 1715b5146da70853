"""Token-bucket arithmetic: limits parse, caps hold over every window, reservations queue."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.errors import ConfigurationError
from consumer.ratelimit import MICROS, Grant, Limit, parse_limit, take


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("500/day", Limit(500, 86400)),
        ("20/minute", Limit(20, 60)),
        ("20/minutes", Limit(20, 60)),
        ("5/s", Limit(5, 1)),
        ("5/sec", Limit(5, 1)),
        ("99/hour", Limit(99, 3600)),
        ("99 / h", Limit(99, 3600)),
        ("10/30s", Limit(10, 30)),
        ("1000/d", Limit(1000, 86400)),
    ],
)
def test_parse_limit(text: str, limit: Limit) -> None:
    assert parse_limit(text) == limit


@pytest.mark.parametrize("text", ["", "500", "500/week", "0/day", "-1/day", "5/0s", "x/s"])
def test_parse_limit_refuses(text: str) -> None:
    with pytest.raises(ConfigurationError, match="limit"):
        parse_limit(text)


def test_limit_prints_as_it_parses() -> None:
    assert [str(parse_limit(t)) for t in ("500/day", "20/min", "10/30s")] == [
        "500/day",
        "20/minute",
        "10/30s",
    ]


def test_interval_rounds_up() -> None:
    assert Limit(3, 1).interval_us == 333_334
    assert Limit(50, 1).interval_us == 20_000


def run(limits: list[Limit], burst: int, requests: list[tuple[int, bool]]) -> list[Grant]:
    """Feed requests (time, reserve?) through the buckets; the grants, in order."""
    tats = [0] * len(limits)
    grants = []
    for now, reserve in requests:
        grant, tats = take(limits, burst, tats, now, 2**62 if reserve else 0)
        if grant.granted:
            grants.append(grant)
    return grants


def most_in_a_window(slots: list[int], length_us: int) -> int:
    """The largest number of ``slots`` in any half-open window of ``length_us``."""
    ordered = sorted(slots)
    best, start = 0, 0
    for end, slot in enumerate(ordered):
        while ordered[start] <= slot - length_us:
            start += 1
        best = max(best, end - start + 1)
    return best


limit_strategy = st.builds(
    Limit, st.integers(min_value=1, max_value=30), st.sampled_from([1, 2, 60])
)


@settings(max_examples=200, deadline=None)
@given(
    limits=st.lists(limit_strategy, min_size=1, max_size=3),
    burst=st.integers(min_value=1, max_value=6),
    gaps=st.lists(st.integers(min_value=0, max_value=400_000), min_size=1, max_size=300),
    reserves=st.lists(st.booleans(), min_size=300, max_size=300),
)
def test_no_window_holds_more_than_limit_plus_burst_less_one(
    limits: list[Limit], burst: int, gaps: list[int], reserves: list[bool]
) -> None:
    now, requests = 10**12, []
    for gap, reserve in zip(gaps, reserves, strict=False):
        now += gap
        requests.append((now, reserve))
    slots = [g.slot_us for g in run(limits, burst, requests)]
    for limit in limits:
        assert most_in_a_window(slots, limit.period * MICROS) <= limit.count + burst - 1


@given(burst=st.integers(min_value=1, max_value=10))
def test_a_burst_goes_back_to_back_after_a_quiet_spell(burst: int) -> None:
    grants = run([Limit(5, 1)], burst, [(10**12, False)] * 30)
    assert len(grants) == burst


def test_a_burst_of_one_is_a_sliding_cap() -> None:
    """The old hourly cap: never more than 99 in any hour, however the demand comes."""
    hour = 3600 * MICROS
    requests = [(10**12 + i * 10 * MICROS, True) for i in range(400)]
    slots = [g.slot_us for g in run([Limit(99, 3600)], 1, requests)]
    assert most_in_a_window(slots, hour) == 99


def test_reservations_queue_one_interval_apart() -> None:
    now = 10**12
    slots = [g.slot_us - now for g in run([Limit(50, 1)], 1, [(now, True)] * 5)]
    assert slots == [0, 20_000, 40_000, 60_000, 80_000]


def test_a_refused_take_leaves_the_buckets_alone() -> None:
    limits, tats = [Limit(1, 1)], [0]
    first, tats = take(limits, 1, tats, 10**12, 0)
    second, after = take(limits, 1, tats, 10**12 + 1, 0)
    assert first.granted
    assert not second.granted
    assert after == tats
    assert second.wait == pytest.approx(1 - 1e-6)


def test_every_limit_must_allow() -> None:
    """5/second with burst 5 lets 5 through at once; 6/minute then holds the sixth."""
    now = 10**12
    limits = [Limit(5, 1), Limit(6, 60)]
    grants = run(limits, 5, [(now, True)] * 12)
    offsets = [(g.slot_us - now) / MICROS for g in grants]
    assert offsets[:5] == [0, 0, 0, 0, 0]
    assert offsets[5] == 10  # 6/minute with burst 5: the token of the tenth second
    assert most_in_a_window([g.slot_us for g in grants], 60 * MICROS) <= 6 + 5 - 1


def test_long_run_rate_is_the_limit() -> None:
    now = 10**12
    grants = run([Limit(50, 1)], 3, [(now + i * 1000, False) for i in range(20_000)])
    assert len(grants) == pytest.approx(50 * 20 + 3 - 1, abs=1)
