"""Group commit: concurrent calls share one flush, each gets its own answer."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from consumer.store.batches import Batcher


class Recorder:
    """A flush that records its batches and answers each item doubled."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_on = fail_on

    async def flush(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(0.01)  # a round trip, during which more calls arrive
        if self.fail_on in items:
            raise ConnectionError(f"batch with {self.fail_on} failed")
        return [item * 2 for item in items]


async def test_calls_made_together_go_together() -> None:
    recorder = Recorder()
    batcher = Batcher(recorder.flush)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
    assert results == [i * 2 for i in range(10)]
    assert recorder.batches == [list(range(10))]


async def test_calls_made_while_a_batch_is_out_go_in_the_next() -> None:
    recorder = Recorder()
    batcher = Batcher(recorder.flush)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0)  # the first batch is on its way, alone: no waiting for company
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 5)]
    assert await asyncio.gather(first, *rest) == [0, 2, 4, 6, 8]
    assert recorder.batches == [[0], [1, 2, 3, 4]]


async def test_batches_are_bounded() -> None:
    recorder = Recorder()
    batcher = Batcher(recorder.flush, max_batch=4)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
    assert results == [i * 2 for i in range(10)]
    assert [len(b) for b in recorder.batches] == [4, 4, 2]


async def test_a_failed_batch_fails_its_callers_only() -> None:
    recorder = Recorder(fail_on=0)
    batcher = Batcher(recorder.flush)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0)  # the first batch is on its way
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
    with pytest.raises(ConnectionError, match="batch with 0 failed"):
        await first
    assert await asyncio.gather(*rest) == [2, 4]
    # Nothing is left running: a later call starts a new batch.
    assert await batcher.submit(5) == 10
    assert recorder.batches == [[0], [1, 2], [5]]


async def test_a_batch_refused_for_one_item_fails_that_item_only() -> None:
    recorder = Recorder(fail_on=3)
    batcher = Batcher(recorder.flush)
    calls = [asyncio.ensure_future(batcher.submit(i)) for i in range(5)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[:3] == [0, 2, 4]
    assert results[4] == 8
    assert isinstance(results[3], ConnectionError)
    assert recorder.batches == [[0, 1, 2, 3, 4], [0], [1], [2], [3], [4]]


async def test_a_batch_refused_by_the_server_is_not_split() -> None:
    recorder = Recorder(fail_on=3)
    batcher = Batcher(recorder.flush, split=lambda exc: not isinstance(exc, ConnectionError))
    calls = [asyncio.ensure_future(batcher.submit(i)) for i in range(5)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(result, ConnectionError) for result in results)
    assert recorder.batches == [[0, 1, 2, 3, 4]]
