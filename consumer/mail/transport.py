"""Handing built messages to an SMTP server (aiosmtplib) over pooled connections.

Each outbox gets a :class:`SMTPPool`: at most ``size`` connections, reused from job to job,
closed after ``idle_seconds`` unused, and never reused after an error. A connection idle
for more than :data:`PROBE_AFTER` seconds is probed with NOOP first, because the server
may have dropped it meanwhile; once a send has begun, a failure is never retried here
(the server may have taken the mail): it goes to the retry policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import aiosmtplib

from consumer.core.mime import Mail
from consumer.core.outboxes import Outbox
from consumer.core.outcomes import SendResult
from consumer.logging import get_logger

log = get_logger(__name__)
# Seconds of idleness after which a pooled connection is checked before use.
PROBE_AFTER = 1.0


class Sender(Protocol):
    """What a job is handed to: an outbox's :class:`SMTPPool` or sendmail pipe."""

    outbox: Outbox

    @property
    def connections(self) -> int:
        """Connections (or programs) open right now."""
        ...

    async def send(self, mail: Mail, sender: str, recipients: list[str]) -> SendResult:
        """Hand ``mail`` over for ``recipients``; raises on failure, classified by
        :func:`consumer.mail.failures.classify`.
        """
        ...

    async def close(self) -> None:
        """Let go of anything kept open."""
        ...


@dataclass
class _Idle:
    smtp: aiosmtplib.SMTP
    since: float


def client(outbox: Outbox) -> aiosmtplib.SMTP:
    """An unconnected client for ``outbox``: ``connect()`` does TLS or STARTTLS, and AUTH
    when a username is set.
    """
    password = outbox.password.get_secret_value() if outbox.password is not None else None
    return aiosmtplib.SMTP(
        hostname=outbox.host,
        port=outbox.port,
        use_tls=outbox.security == "tls",
        start_tls=outbox.security == "starttls",
        validate_certs=outbox.verify_tls,
        username=outbox.username,
        password=password,
        timeout=outbox.timeout,
    )


class SMTPPool:
    """A bounded pool of SMTP connections to one outbox."""

    def __init__(self, outbox: Outbox, size: int, idle_seconds: float) -> None:
        self.outbox = outbox
        self.idle_seconds = idle_seconds
        self._slots = asyncio.Semaphore(size)
        self._idle: deque[_Idle] = deque()
        self._reaper: asyncio.Task[None] | None = None
        self.opened = 0
        self._busy = 0

    @property
    def connections(self) -> int:
        """Connections open right now: sending, and idle in the pool."""
        return self._busy + len(self._idle)

    async def send(self, mail: Mail, sender: str, recipients: list[str]) -> SendResult:
        """Send ``mail`` on a pooled connection; raises aiosmtplib's exceptions on failure.

        Its serialized bytes go as they are, with SMTPUTF8 when an address in the envelope
        or the headers is not ASCII (a server without it refuses: ``SMTPNotSupported``),
        and BODY=8BITMIME when the bytes are not all ASCII (a raw job's 8-bit body, which
        a 7-bit relay would otherwise convert, breaking its signatures).
        """
        options = ["SMTPUTF8"] if mail.utf8 or not (sender + "".join(recipients)).isascii() else []
        if not mail.wire.isascii():
            options.append("BODY=8BITMIME")
        async with self._slots:
            smtp = await self._take()
            self._busy += 1
            try:
                refused, reply = await smtp.sendmail(
                    sender, recipients, mail.wire, mail_options=options
                )
            except BaseException:
                smtp.close()  # its state is unknown: never reuse it
                raise
            finally:
                self._busy -= 1
            self._give_back(smtp)
        return SendResult(
            code=250,
            message=reply,
            refused={rcpt: (r.code, r.message) for rcpt, r in refused.items()},
        )

    async def _take(self) -> aiosmtplib.SMTP:
        now = time.monotonic()
        while self._idle:
            idle = self._idle.pop()  # the most recently used: the likeliest to be alive
            if not idle.smtp.is_connected:
                continue
            if now - idle.since <= PROBE_AFTER or await _answers(idle.smtp):
                return idle.smtp
        return await self._open()

    async def _open(self) -> aiosmtplib.SMTP:
        smtp = client(self.outbox)
        await smtp.connect()
        self.opened += 1
        log.debug("smtp.connected", outbox=self.outbox.name, opened=self.opened)
        return smtp

    def _give_back(self, smtp: aiosmtplib.SMTP) -> None:
        self._idle.append(_Idle(smtp, time.monotonic()))
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap())

    async def _reap(self) -> None:
        """Close connections unused for ``idle_seconds``; ends when none is left."""
        while self._idle:
            await asyncio.sleep(self.idle_seconds / 2)
            cutoff = time.monotonic() - self.idle_seconds
            stale = [idle for idle in self._idle if idle.since <= cutoff]
            for idle in stale:
                self._idle.remove(idle)
                await _quit(idle.smtp)

    async def close(self) -> None:
        """Close every idle connection (in-flight sends keep theirs until they finish)."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        while self._idle:
            await _quit(self._idle.pop().smtp)


async def _answers(smtp: aiosmtplib.SMTP) -> bool:
    """True when the server still answers on this connection; closes it otherwise."""
    try:
        await smtp.noop()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        smtp.close()
        return False
    return True


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    """Say goodbye politely; a server that already left is fine too."""
    try:
        await smtp.quit()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        smtp.close()
