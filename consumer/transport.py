"""Handing a built message to an SMTP server (aiosmtplib)."""

from __future__ import annotations

from dataclasses import dataclass
from email.message import EmailMessage

import aiosmtplib

from consumer.outboxes import Outbox


@dataclass(frozen=True)
class SendResult:
    """The server's acceptance, and the recipients it refused while accepting others."""

    code: int
    message: str
    refused: dict[str, tuple[int, str]]


async def send(
    outbox: Outbox, message: EmailMessage, sender: str, recipients: list[str]
) -> SendResult:
    """Send ``message`` through ``outbox``; raises aiosmtplib's exceptions on failure."""
    password = outbox.password.get_secret_value() if outbox.password is not None else None
    smtp = aiosmtplib.SMTP(
        hostname=outbox.host,
        port=outbox.port,
        use_tls=outbox.security == "tls",
        start_tls=outbox.security == "starttls",
        validate_certs=outbox.verify_tls,
        username=outbox.username,
        password=password,
        timeout=outbox.timeout,
    )
    async with smtp:
        refused, reply = await smtp.send_message(message, sender=sender, recipients=recipients)
    return SendResult(
        code=250,
        message=reply,
        refused={rcpt: (r.code, r.message) for rcpt, r in refused.items()},
    )
