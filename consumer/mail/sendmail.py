"""Handing built messages to a local sendmail program (Postfix, Exim, msmtp, nullmailer).

The program gets ``-i -f SENDER -- RECIPIENT...``: recipients on the command line rather
than ``-t``, because the message's headers never name Bcc recipients, and a retry after a
partial delivery goes to the recipients still owed the mail only. Its exit status decides
success (0), a later retry (sysexits 75 and friends) or a permanent failure.
"""

from __future__ import annotations

import asyncio
import contextlib

from consumer.core.mime import UTF8_POLICY, Mail
from consumer.core.outboxes import Outbox
from consumer.core.outcomes import SendResult
from consumer.errors import SendmailError

# Bytes of the program's output kept for the error message.
_OUTPUT_LIMIT = 500


class SendmailPipe:
    """Runs the outbox's sendmail program once per message, at most ``size`` at a time."""

    def __init__(self, outbox: Outbox, size: int) -> None:
        self.outbox = outbox
        self._slots = asyncio.Semaphore(size)
        self._running = 0

    @property
    def connections(self) -> int:
        """Programs running right now."""
        return self._running

    async def send(self, mail: Mail, sender: str, recipients: list[str]) -> SendResult:
        """Pipe ``mail`` to the program, with LF line ends as a local program expects;
        raises :class:`SendmailError`, ``OSError`` (no such program) or ``TimeoutError``
        (killed after the outbox's timeout).
        """
        # A raw job's bytes go as given, and signed ones as signed: written again from the
        # message, they would no longer match their signature.
        if mail.message is None or mail.signed:
            data = mail.wire.replace(b"\r\n", b"\n")
        else:  # like SMTPUTF8: raw UTF-8 headers only when an address needs them
            utf8 = mail.utf8 or not (sender + "".join(recipients)).isascii()
            data = mail.message.as_bytes(policy=UTF8_POLICY if utf8 else None)
        async with self._slots:
            process = await asyncio.create_subprocess_exec(
                self.outbox.command,
                "-i",
                "-f",
                sender,
                "--",
                *recipients,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            self._running += 1
            try:
                async with asyncio.timeout(self.outbox.timeout):
                    output, _ = await process.communicate(data)
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
                raise
            finally:
                self._running -= 1
        text = output[:_OUTPUT_LIMIT].decode("utf-8", "replace").strip()
        if process.returncode:
            raise SendmailError(process.returncode, text)
        return SendResult(
            code=250, message=text or f"accepted by {self.outbox.command}", refused={}
        )

    async def close(self) -> None:
        """Nothing is kept open between messages."""
