"""The store's clock: the offset arithmetic, and a worker reading MongoDB's time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from consumer import clock as clock_module
from consumer.clock import StoreClock, offset_from, utcnow
from consumer.store.jobs import JobStore

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def test_the_offset_is_read_against_the_midpoint_of_the_exchange() -> None:
    ms = timedelta(milliseconds=1)
    # Sent at 0, answered at 10 ms: the server read its clock at our 5 ms.
    assert offset_from(T0, T0 + 5 * ms, T0 + 10 * ms) == timedelta(0)
    assert offset_from(T0, T0 + 4005 * ms, T0 + 10 * ms) == timedelta(seconds=4)
    assert offset_from(T0, T0 - 3995 * ms, T0 + 10 * ms) == timedelta(seconds=-4)


async def test_the_sample_with_the_shortest_round_trip_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ms = timedelta(milliseconds=1)
    # Three exchanges, as (sent, received) on our clock and the server's reading: the
    # second took 10 ms and says 3 s ahead; the slow ones would say otherwise.
    ours = iter([T0, T0 + 100 * ms, T0 + 200 * ms, T0 + 210 * ms, T0 + 300 * ms, T0 + 400 * ms])
    theirs = iter([T0 + 9050 * ms, T0 + 3205 * ms, T0 + 9350 * ms])
    monkeypatch.setattr(clock_module, "utcnow", lambda: next(ours))

    async def read() -> datetime:
        return next(theirs)

    clock = StoreClock()
    assert await clock.measure(read) == timedelta(seconds=3)
    assert clock.offset == timedelta(seconds=3)


async def test_a_worker_reads_the_servers_clock(store: JobStore) -> None:
    clock = StoreClock()
    offset = await clock.measure(store.server_time)
    # The test server runs on this machine: the clocks agree to a few milliseconds.
    assert abs(offset) < timedelta(milliseconds=100)
    assert abs(clock.now() - utcnow()) < timedelta(milliseconds=100)
