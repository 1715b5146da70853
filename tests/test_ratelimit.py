"""Token-bucket arithmetic: limits parse, caps hold over every window, reservations queue."""

from __future__ import annotations

import heapq
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.core.ratelimit import MICROS, Bucket, Limit, Mode, parse_limit, take, tokens_left
from consumer.errors import ConfigurationError
from deploy.bench.rate_limit import most_in_a_window


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


def simulate(
    limits: list[Limit], burst: int, arrivals: list[int], lateness: list[int] | None = None
) -> list[int]:
    """Jobs arrive at ``arrivals`` (µs); a refused one queues and comes back at its slot,
    late by the next of ``lateness``. Returns the times tokens were taken.
    """
    buckets = [Bucket()] * len(limits)
    pending: list[tuple[int, int, Mode]] = [(at, job, "enqueue") for job, at in enumerate(arrivals)]
    heapq.heapify(pending)
    late = itertools.cycle(lateness or [0])
    granted = []
    while pending:
        now, job, mode = heapq.heappop(pending)
        [grant], buckets = take(limits, burst, buckets, now, mode)
        if grant.granted:
            granted.append(now)
        else:
            heapq.heappush(pending, (grant.slot_us + next(late), job, "queued"))
    return granted


limit_strategy = st.builds(
    Limit, st.integers(min_value=1, max_value=30), st.sampled_from([1, 2, 60])
)


@settings(max_examples=200, deadline=None)
@given(
    limits=st.lists(limit_strategy, min_size=1, max_size=3),
    burst=st.integers(min_value=1, max_value=6),
    gaps=st.lists(st.integers(min_value=0, max_value=400_000), min_size=1, max_size=200),
    lateness=st.lists(st.integers(min_value=0, max_value=2_000_000), min_size=1, max_size=20),
)
def test_no_window_holds_more_than_limit_plus_burst_less_one(
    limits: list[Limit], burst: int, gaps: list[int], lateness: list[int]
) -> None:
    """Whatever the arrivals and however late queued jobs wake, every job gets its token
    and no window holds more than the limit allows.
    """
    arrivals = list(itertools.accumulate(gaps, initial=10**12))[1:]
    granted = simulate(limits, burst, arrivals, lateness)
    assert len(granted) == len(arrivals)
    for limit in limits:
        assert most_in_a_window(granted, limit.period * MICROS) <= limit.count + burst - 1


@given(burst=st.integers(min_value=1, max_value=10))
def test_a_burst_goes_back_to_back_after_a_quiet_spell(burst: int) -> None:
    granted = simulate([Limit(5, 1)], burst, [10**12] * 30)
    assert granted.count(10**12) == burst


def test_a_burst_of_one_is_a_sliding_cap() -> None:
    """The old hourly cap: never more than 99 in any hour, however the demand comes."""
    arrivals = [10**12 + i * 10 * MICROS for i in range(400)]
    granted = simulate([Limit(99, 3600)], 1, arrivals)
    assert most_in_a_window(granted, 3600 * MICROS) == 99


def test_a_minute_and_an_hour_cap_hold_together_over_several_windows() -> None:
    """Five hours of steady demand (a job every 10 s). With 1/minute and 100/hour the
    minute cap allows 60 an hour, under the hour cap: one send in any minute, 60 in any
    hour. With 40/hour instead the hour cap binds: exactly 40 in every hour, and still
    never two in a minute.
    """
    arrivals = [10**12 + i * 10 * MICROS for i in range(5 * 360)]
    granted = simulate([Limit(1, 60), Limit(100, 3600)], 1, arrivals)
    assert most_in_a_window(granted, 60 * MICROS) == 1
    assert most_in_a_window(granted, 3600 * MICROS) == 60
    tighter = simulate([Limit(1, 60), Limit(40, 3600)], 1, arrivals)
    assert most_in_a_window(tighter, 60 * MICROS) == 1
    assert most_in_a_window(tighter, 3600 * MICROS) == 40
    hours = [(t - tighter[0]) // (3600 * MICROS) for t in tighter]
    assert [hours.count(h) for h in range(4)] == [40] * 4


def test_a_backlog_drains_at_the_limit_in_arrival_order() -> None:
    now = 10**12
    granted = simulate([Limit(50, 1)], 1, [now] * 5)
    assert [t - now for t in granted] == [0, 20_000, 40_000, 60_000, 80_000]


def test_queued_jobs_go_before_new_ones() -> None:
    limits, now = [Limit(1, 1)], 10**12
    [first], buckets = take(limits, 1, [Bucket()], now, "enqueue")
    [second], buckets = take(limits, 1, buckets, now, "enqueue")
    assert first.granted
    assert (second.granted, second.queued, second.slot_us - now) == (False, True, MICROS)
    [newcomer], after = take(limits, 1, buckets, now + MICROS, "try")
    assert not newcomer.granted  # the queued job's slot
    assert after == buckets
    [woken], buckets = take(limits, 1, buckets, now + MICROS, "queued")
    assert woken.granted


def test_a_late_wake_up_takes_the_token_when_it_comes() -> None:
    limits, now = [Limit(2, 1)], 10**12
    _, buckets = take(limits, 1, [Bucket()], now, "enqueue")
    [queued], buckets = take(limits, 1, buckets, now, "enqueue")
    assert queued.slot_us == now + 500_000
    [early], same = take(limits, 1, buckets, now + 100_000, "queued")  # a clock ahead
    assert (early.granted, early.slot_us) == (False, now + 500_000)
    assert same == buckets
    [late], _ = take(limits, 1, buckets, now + 900_000, "queued")
    assert late.granted


@settings(max_examples=200, deadline=None)
@given(
    limits=st.lists(limit_strategy, min_size=1, max_size=3),
    burst=st.integers(min_value=1, max_value=6),
    before=st.integers(min_value=0, max_value=20),
    count=st.integers(min_value=1, max_value=40),
    horizon=st.integers(min_value=0, max_value=3 * MICROS),
    mode=st.sampled_from(["try", "enqueue", "queued"]),
)
def test_a_block_is_the_tokens_taken_one_by_one_at_their_slots(
    limits: list[Limit], burst: int, before: int, count: int, horizon: int, mode: Mode
) -> None:
    """Taking ``count`` tokens at once hands out exactly the slots, and leaves exactly
    the buckets, that taking them one at a time at those slots would: a block never
    lets more through than single sends.
    """
    now = 10**12
    buckets = [Bucket()] * len(limits)
    for _ in range(before):
        _, buckets = take(limits, burst, buckets, now, "enqueue")
    grants, after = take(limits, burst, buckets, now, mode, count, horizon)
    assert len(grants) == count
    tokens = [g for g in grants if g.granted]
    assert grants[: len(tokens)] == tokens  # the tokens first, then the refusals
    one_by_one = buckets
    for token in tokens:
        assert now <= token.slot_us <= now + horizon
        [single], one_by_one = take(limits, burst, one_by_one, token.slot_us, "queued")
        assert (single.granted, single.slot_us) == (True, token.slot_us)
    refused = grants[len(tokens) :]
    if mode == "enqueue":
        slots = [g.slot_us for g in refused]
        assert all(g.queued for g in refused)
        assert slots == sorted(slots)
    else:
        assert after == one_by_one
        assert not any(g.queued for g in refused)


def test_new_jobs_take_a_block_only_while_nobody_queues() -> None:
    limits, now, horizon = [Limit(50, 1)], 10**12, 2 * MICROS
    grants, buckets = take(limits, 1, [Bucket()], now, "enqueue", 120, horizon)
    offsets = [(g.granted, g.slot_us - now) for g in grants]
    # Two seconds of tokens at 50/s, the first one now; the rest queue behind them.
    assert offsets[:101] == [(True, i * 20_000) for i in range(101)]
    assert offsets[101:] == [(False, (101 + i) * 20_000) for i in range(19)]
    newcomers, _ = take(limits, 1, buckets, now + MICROS, "enqueue", 3, horizon)
    assert not any(g.granted for g in newcomers)
    [woken], _ = take(limits, 1, buckets, now + 2 * MICROS, "queued", 1, horizon)
    assert (woken.granted, woken.slot_us) == (True, now + 101 * 20_000)


def test_every_limit_must_allow() -> None:
    """5/second with burst 5 lets 5 through at once; 6/minute then holds the sixth."""
    now = 10**12
    limits = [Limit(5, 1), Limit(6, 60)]
    granted = simulate(limits, 5, [now] * 12)
    offsets = [(t - now) / MICROS for t in granted]
    assert offsets[:5] == [0, 0, 0, 0, 0]
    assert offsets[5] == 10  # 6/minute with burst 5: the token of the tenth second
    assert most_in_a_window(granted, 60 * MICROS) <= 6 + 5 - 1


def test_long_run_rate_is_the_limit() -> None:
    now = 10**12
    arrivals = [now + i * 1000 for i in range(20_000)]
    granted = simulate([Limit(50, 1)], 3, arrivals)
    assert sum(1 for t in granted if t < now + 20 * MICROS) == 50 * 20 + 3 - 1


@given(
    count=st.integers(1, 100),
    burst=st.integers(1, 10),
    taken=st.integers(0, 15),
    later=st.integers(0, 3 * MICROS),
)
def test_tokens_left_counts_the_sends_a_bucket_allows(
    count: int, burst: int, taken: int, later: int
) -> None:
    """What ``mailbus status`` reports is exactly how many sends would go through now."""
    limit, start = Limit(count, 1), 10 * MICROS
    buckets = [Bucket()]
    for _ in range(taken):
        _, buckets = take([limit], burst, buckets, start, "try")
    now = start + later
    left = tokens_left(limit, burst, buckets[0], now)
    allowed = 0
    while take([limit], burst, buckets, now, "try")[0][0].granted:
        _, buckets = take([limit], burst, buckets, now, "try")
        allowed += 1
    assert left == allowed
