"""Whatever handling a delivery raises, the delivery ends settled once: the guard the
worker runs every delivery under, tried with an in-process delivery double.
"""

from __future__ import annotations

from typing import cast

import pytest
from aio_pika.abc import AbstractIncomingMessage

from consumer.service.worker import settled_once


class Delivery:
    """Just what the guard reads and calls of a delivery."""

    def __init__(self) -> None:
        self.message_id = "job-1"
        self.processed = False
        self.settlements: list[str] = []

    async def ack(self) -> None:
        self.processed = True
        self.settlements.append("ack")

    async def nack(self, requeue: bool = True) -> None:
        self.processed = True
        self.settlements.append("requeue" if requeue else "nack")


async def guarded(delivery: Delivery, fail: str | None, settle: str | None) -> None:
    async def handling() -> None:
        if settle == "ack":
            await delivery.ack()
        elif settle == "nack":
            await delivery.nack(requeue=True)
        if fail == "error":
            raise RuntimeError("a bug outside the pipeline")

    await settled_once(cast(AbstractIncomingMessage, delivery), handling())


@pytest.mark.parametrize(
    ("fail", "settle", "settlements"),
    [
        (None, "ack", ["ack"]),  # settled as usual: left alone
        ("error", None, ["requeue"]),  # raised before settling: returned to its queue
        ("error", "ack", ["ack"]),  # raised after settling: not settled twice
        (None, None, []),  # left unsettled on purpose (its copies failed): waits for the channel
    ],
)
async def test_a_delivery_is_settled_once(
    fail: str | None, settle: str | None, settlements: list[str]
) -> None:
    delivery = Delivery()
    await guarded(delivery, fail, settle)
    assert delivery.settlements == settlements
