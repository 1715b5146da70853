"""Settling deliveries, tried with in-process doubles of a channel and its deliveries:
whatever handling raises, a delivery ends settled once; acks decided together go out as
one frame when they are the channel's oldest, and never cover a delivery that is not
acked.
"""

from __future__ import annotations

import asyncio
from typing import cast

import pytest
from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import ChannelInvalidStateError

from consumer.amqp.acks import Acks
from consumer.service.worker import settled_once


class Channel:
    """The frames a channel is asked to send, in order."""

    def __init__(self) -> None:
        self.is_closed = False
        self.frames: list[tuple[str, int, bool]] = []

    async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        if self.is_closed:
            raise ChannelInvalidStateError("closed")
        self.frames.append(("ack", delivery_tag, multiple))


class Delivery:
    """Just what the guard and :class:`Acks` read and call of a delivery."""

    def __init__(self, channel: Channel, tag: int) -> None:
        self.message_id = f"job-{tag}"
        self.delivery_tag = tag
        self._channel = channel
        self.processed = False

    @property
    def channel(self) -> Channel:
        if self._channel.is_closed:
            raise ChannelInvalidStateError("closed")
        return self._channel

    async def ack(self) -> None:
        self.processed = True
        self._channel.frames.append(("ack", self.delivery_tag, False))

    async def nack(self, requeue: bool = True) -> None:
        self.processed = True
        self._channel.frames.append(("requeue" if requeue else "nack", self.delivery_tag, False))


def delivered(acks: Acks, channel: Channel, count: int) -> list[AbstractIncomingMessage]:
    messages = [cast(AbstractIncomingMessage, Delivery(channel, tag + 1)) for tag in range(count)]
    for message in messages:
        acks.received(message)
    return messages


@pytest.mark.parametrize(
    ("fail", "settle", "frames"),
    [
        (None, "ack", [("ack", 1, False)]),  # settled as usual: left alone
        ("error", None, [("requeue", 1, False)]),  # raised before settling: returned
        ("error", "ack", [("ack", 1, False)]),  # raised after settling: not settled twice
        (None, None, []),  # left unsettled on purpose (its copies failed): waits for the channel
    ],
)
async def test_a_delivery_is_settled_once(
    fail: str | None, settle: str | None, frames: list[tuple[str, int, bool]]
) -> None:
    acks, channel = Acks(), Channel()
    (message,) = delivered(acks, channel, 1)

    async def handling() -> None:
        if settle == "ack":
            await acks.ack(message)
        if fail == "error":
            raise RuntimeError("a bug outside the pipeline")

    await settled_once(message, handling(), acks)
    assert channel.frames == frames
    assert acks.settled(message) == (settle is not None or fail is not None)


async def test_acks_decided_together_go_as_one_frame() -> None:
    acks, channel = Acks(), Channel()
    messages = delivered(acks, channel, 5)
    await asyncio.gather(*(acks.ack(m) for m in reversed(messages)))
    assert channel.frames == [("ack", 5, True)]
    assert all(acks.settled(m) for m in messages)


async def test_a_multiple_ack_never_covers_an_unsettled_or_nacked_delivery() -> None:
    acks, channel = Acks(), Channel()
    one, two, three, four, five = delivered(acks, channel, 5)
    await acks.nack(three, requeue=True)
    await asyncio.gather(acks.ack(two), acks.ack(four), acks.ack(five))
    # One is still being sent: nothing may cover it, so each ack goes alone.
    assert channel.frames == [
        ("requeue", 3, False),
        ("ack", 2, False),
        ("ack", 4, False),
        ("ack", 5, False),
    ]
    assert not acks.settled(one)
    await acks.ack(one)
    assert channel.frames[-1] == ("ack", 1, False)
    assert acks.settled(one)


async def test_the_oldest_acked_go_as_one_and_the_rest_alone() -> None:
    acks, channel = Acks(), Channel()
    messages = delivered(acks, channel, 6)
    # 1-3 and 5-6 finish together; 4 is still on its way.
    await asyncio.gather(*(acks.ack(messages[i]) for i in (0, 1, 2, 4, 5)))
    assert channel.frames == [("ack", 3, True), ("ack", 5, False), ("ack", 6, False)]
    assert [acks.settled(m) for m in messages] == [True, True, True, False, True, True]


async def test_deliveries_noted_out_of_order_are_acked_by_their_tags() -> None:
    acks, channel = Acks(), Channel()
    five, six, seven = (cast(AbstractIncomingMessage, Delivery(channel, t)) for t in (5, 6, 7))
    for message in (six, five, seven):
        acks.received(message)
    await asyncio.gather(acks.ack(six), acks.ack(seven))
    # Five is unsettled: a multiple ack up to seven would take it along.
    assert channel.frames == [("ack", 6, False), ("ack", 7, False)]
    assert not acks.settled(five)


async def test_acks_of_a_closed_channel_fail_to_their_callers() -> None:
    acks, channel = Acks(), Channel()
    messages = delivered(acks, channel, 2)
    pending = [asyncio.ensure_future(acks.ack(m)) for m in messages]
    channel.is_closed = True
    results = await asyncio.gather(*pending, return_exceptions=True)
    assert all(isinstance(r, ChannelInvalidStateError) for r in results)
    assert channel.frames == []
    # The broker has them back: there is nothing left to settle.
    assert all(acks.settled(m) for m in messages)


async def test_a_delivery_acked_twice_is_refused() -> None:
    acks, channel = Acks(), Channel()
    (message,) = delivered(acks, channel, 1)
    first = asyncio.ensure_future(acks.ack(message))
    await asyncio.sleep(0)
    with pytest.raises(Exception, match="already processed"):
        await acks.ack(message)
    await first
    assert channel.frames == [("ack", 1, False)]
