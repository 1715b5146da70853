"""SMTP and sendmail failures, classified for the retry policy by exception type and reply."""

from __future__ import annotations

from collections.abc import Sequence

import aiosmtplib

from consumer.core.outcomes import Failure
from consumer.core.replies import ReplyRule
from consumer.core.retry import reply_verdict
from consumer.errors import AttachmentUnavailableError, SendmailError


def classify(exc: BaseException, rules: Sequence[ReplyRule] = ()) -> Failure:
    """Decide whether ``exc``, raised while sending, is worth another attempt.

    An SMTP reply means what :func:`~consumer.core.retry.reply_verdict` says, under the
    outbox's provider's ``rules``: by default 4xx are transient (421 and 4.7.x throttle)
    and 5xx permanent. Timeouts and connection errors are transient (a server never
    reached is marked so). Authentication failures are the outbox's fault, not the
    mail's: transient. A sendmail program's exit status says which it is (sysexits: 75
    is "try again later").
    """
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        refusals = exc.recipients
        verdicts = [reply_verdict(r.code, r.message, rules) for r in refusals]
        temporary = [r for r, v in zip(refusals, verdicts, strict=True) if v != "permanent"]
        first = (temporary or refusals)[0] if refusals else None
        if first is None:
            return Failure(True, None, "all recipients refused")
        replies = {r.recipient: (r.code, r.message) for r in refusals}
        message = f"<{first.recipient}> {first.message}"
        throttle = "throttle" in verdicts
        return Failure(bool(temporary), first.code, message, replies, throttle=throttle)
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return Failure(True, exc.code, f"authentication failed: {exc.message}")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        verdict = reply_verdict(exc.code, exc.message, rules)
        return Failure(
            verdict != "permanent", exc.code, exc.message, throttle=verdict == "throttle"
        )
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
