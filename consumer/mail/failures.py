"""SMTP and sendmail failures, classified for the retry policy by exception type and code."""

from __future__ import annotations

import aiosmtplib

from consumer.core.outcomes import Failure
from consumer.core.retry import is_transient_code
from consumer.errors import AttachmentUnavailableError, SendmailError


def classify(exc: BaseException) -> Failure:
    """Decide whether ``exc``, raised while sending, is worth another attempt.

    4xx replies, timeouts and connection errors are transient (a server never reached is
    marked so); 5xx replies are permanent. Authentication failures are the outbox's fault,
    not the mail's: transient. A sendmail program's exit status says which it is
    (sysexits: 75 is "try again later").
    """
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        refusals = exc.recipients
        temporary = [r for r in refusals if is_transient_code(r.code)]
        first = (temporary or refusals)[0] if refusals else None
        if first is None:
            return Failure(True, None, "all recipients refused")
        replies = {r.recipient: (r.code, r.message) for r in refusals}
        return Failure(bool(temporary), first.code, f"<{first.recipient}> {first.message}", replies)
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return Failure(True, exc.code, f"authentication failed: {exc.message}")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return Failure(not 500 <= exc.code < 600, exc.code, exc.message)
    if isinstance(exc, AttachmentUnavailableError):
        return Failure(True, None, f"attachment unavailable: {exc}")
    if isinstance(exc, SendmailError):
        return Failure(exc.transient, None, str(exc))
    if isinstance(exc, aiosmtplib.SMTPConnectError):
        return Failure(True, None, f"{type(exc).__name__}: {exc}", unreachable=True)
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return Failure(False, None, f"not supported by the server: {exc}")
    if isinstance(exc, aiosmtplib.SMTPException | OSError | TimeoutError):
        return Failure(True, None, f"{type(exc).__name__}: {exc}")
    return Failure(False, None, f"{type(exc).__name__}: {exc}")
