"""Settling deliveries: each once, and the acks of deliveries settled together sent as one.

A worker settles its deliveries out of order, as their jobs finish, and many finish at
once (their records written in one MongoDB command). The acks of a moment go out in one
``basic.ack`` with ``multiple`` for the oldest deliveries of a channel that are all
acked, and one each for the rest; a ``multiple`` ack never covers a delivery that is
unsettled or was nacked, so nothing is acked that was not meant to be. One task sends
them, in the order they were decided, so a later ``multiple`` never overtakes an ack it
would make unknown to the broker.
"""

from __future__ import annotations

import asyncio
import contextlib

from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import MessageProcessError
from aiormq.abc import AbstractChannel
from aiormq.exceptions import ChannelInvalidStateError

# The acks of a delivery as it waits: unsettled (None), or acked and waiting for the frame.
_Waiting = asyncio.Future[None] | None


class Acks:
    """The deliveries of the channels a worker consumes, and the one way it settles them."""

    def __init__(self) -> None:
        self._open: dict[AbstractChannel, dict[int, _Waiting]] = {}
        self._sender: asyncio.Task[None] | None = None

    def received(self, message: AbstractIncomingMessage) -> None:
        """Note a delivery to settle later."""
        tag = message.delivery_tag
        if tag is None or message.processed:
            return
        channel = message.channel
        tags = self._open.get(channel)
        if tags is None:
            # A new channel: a reconnection's, after which the old one's deliveries are
            # the broker's again.
            for closed in [c for c in self._open if c.is_closed]:
                del self._open[closed]
            tags = self._open[channel] = {}
        tags[tag] = None

    def settled(self, message: AbstractIncomingMessage) -> bool:
        """True once ``message`` is acked or nacked, or its channel closed (the broker then
        has it back).
        """
        try:
            channel = message.channel
        except ChannelInvalidStateError:
            return True
        if message.processed:
            return True
        tags = self._open.get(channel)
        return tags is None or message.delivery_tag not in tags

    async def ack(self, message: AbstractIncomingMessage) -> None:
        """Acknowledge ``message``, with the others acked meanwhile; returns once its ack
        is on its way, raising what the channel raised if it could not be.
        """
        tags = self._open.get(message.channel)
        tag = message.delivery_tag
        if tags is None or tag is None or tag not in tags:
            await message.ack()  # not noted when received: acked alone
            return
        if tags[tag] is not None:
            raise MessageProcessError("Message already processed", message)
        sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        tags[tag] = sent
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())
        await sent

    async def nack(self, message: AbstractIncomingMessage, *, requeue: bool) -> None:
        """Reject ``message`` at once, back to its queue with ``requeue``."""
        try:
            await message.nack(requeue=requeue)
        finally:
            tags = self._open.get(message.channel)
            if tags is not None and message.delivery_tag is not None:
                tags.pop(message.delivery_tag, None)

    async def _send(self) -> None:
        """Send the acks decided so far, and those decided while sending, then stop."""
        try:
            while batches := [self._take(channel, tags) for channel, tags in self._open.items()]:
                if not any(frames for _, frames, _ in batches):
                    return
                for channel, frames, waiting in batches:
                    await _send_frames(channel, frames, waiting)
        finally:
            self._sender = None

    def _take(
        self, channel: AbstractChannel, tags: dict[int, _Waiting]
    ) -> tuple[AbstractChannel, list[tuple[int, bool]], list[asyncio.Future[None]]]:
        """The ack frames of ``channel``'s acked deliveries (``(tag, multiple)``), taken off
        its list: the oldest that are all acked as one, the others one each.
        """
        items = sorted(tags.items())  # by delivery tag: what a multiple ack counts by
        oldest = 0
        while oldest < len(items) and items[oldest][1] is not None:
            oldest += 1
        frames = [(items[oldest - 1][0], oldest > 1)] if oldest else []
        frames += [(tag, False) for tag, sent in items[oldest:] if sent is not None]
        waiting = [sent for _, sent in items if sent is not None]
        for tag, sent in items:
            if sent is not None:
                del tags[tag]
        return channel, frames, waiting


async def _send_frames(
    channel: AbstractChannel, frames: list[tuple[int, bool]], waiting: list[asyncio.Future[None]]
) -> None:
    """Send ``frames`` on ``channel``; each waiting ack learns how it went."""
    failure: BaseException | None = None
    try:
        for tag, multiple in frames:
            await channel.basic_ack(delivery_tag=tag, multiple=multiple)
    except Exception as exc:  # the channel closed under them: each ack's caller hears it
        failure = exc
    for sent in waiting:
        if sent.done():
            continue
        if failure is None:
            sent.set_result(None)
        else:
            sent.set_exception(failure)
            with contextlib.suppress(BaseException):
                sent.exception()  # retrieved: a caller gone meanwhile leaves no warning
