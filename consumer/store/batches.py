"""Group commit: concurrent calls of one kind coalesced into one MongoDB command.

The first call goes at once; calls made while it is on its way wait and go together in
the next, so a lone job pays no delay and a busy worker pays one command per batch.
A batch refused for what one of its items holds is tried again item by item, so only
that item's caller sees the error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")
MAX_BATCH = 256


class Batcher(Generic[Item, Result]):
    """Feeds items to ``flush`` in batches; ``flush`` answers each item, in order."""

    def __init__(
        self,
        flush: Callable[[Sequence[Item]], Awaitable[Sequence[Result]]],
        max_batch: int = MAX_BATCH,
        *,
        split: Callable[[Exception], bool] = lambda exc: True,
    ) -> None:
        """``split`` says whether a batch's error may lie with one item (try each alone)
        rather than with the server (fail the whole batch at once).
        """
        self._flush = flush
        self._max_batch = max_batch
        self._split = split
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Result:
        """``item``'s answer, from the batch it went in; raises what that batch raised."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        batch: list[tuple[Item, asyncio.Future[Result]]] = []
        try:
            while self._waiting:
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                try:
                    results = await self._flush([item for item, _ in batch])
                except Exception as exc:
                    if len(batch) > 1 and self._split(exc):
                        await self._one_by_one(batch)
                        continue
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._task = None
            # Only when cancelled midway is anyone left waiting: they are cancelled too.
            for _, future in [*batch, *self._waiting]:
                future.cancel()
            self._waiting.clear()

    async def _one_by_one(self, batch: Sequence[tuple[Item, asyncio.Future[Result]]]) -> None:
        for item, future in batch:
            try:
                (result,) = await self._flush([item])
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
                continue
            if not future.done():
                future.set_result(result)
