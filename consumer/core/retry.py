"""Retry policy: what an SMTP reply means (by its codes and the provider's rules), whether
to try again, and the backoff.

This module is the one place that decides "try again later" versus "never".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from consumer.core.outcomes import Failure
from consumer.core.replies import ReplyRule
from consumer.core.vocabulary import DeadReason, ReplyVerdict

# RFC 3463 enhanced status codes that say the address itself is bad: unknown mailbox (5.1.1),
# unknown domain (5.1.2), bad syntax (5.1.3), moved (5.1.6), domain accepts no mail (5.1.10).
UNKNOWN_ADDRESS_STATUSES = frozenset({"5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10"})
_ENHANCED_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")


def enhanced_status(text: str) -> str | None:
    """The RFC 3463 enhanced status code a reply's text starts with (``5.1.1``), if any."""
    found = _ENHANCED_STATUS.match(text)
    return ".".join(found.groups()) if found else None


def reply_verdict(code: int, text: str, rules: Sequence[ReplyRule] = ()) -> ReplyVerdict:
    """What the SMTP reply ``code`` ``text`` means: the first of the provider's ``rules``
    that matches it decides; without one, its codes do.

    A 5xx reply is permanent, any other transient. The enhanced status code (RFC 3463)
    must agree with the basic code's class (RFC 2034); a server whose two codes disagree
    (``550 4.2.0``, ``451 5.7.1``) is taken at the transient one, since a retry that was
    not needed costs an attempt and a failure that was not final loses the mail. A
    transient ``421`` (the server closes the session) or ``4.7.x`` (policy: too fast,
    too many) is a throttle.
    """
    status = enhanced_status(text)
    for rule in rules:
        if rule.matches(code, status, text):
            return rule.verdict
    if 500 <= code < 600 and (status is None or status.startswith("5.")):
        return "permanent"
    if code == 421 or (status is not None and status.startswith("4.7.")):
        return "throttle"
    return "transient"


def unknown_recipients(
    refused: Mapping[str, tuple[int, str]], rules: Sequence[ReplyRule] = ()
) -> dict[str, str]:
    """The refused recipients a server called non-existent, with its reply.

    Decided by a permanent verdict and the enhanced status code (a structured field, not
    prose): a policy or spam refusal (5.7.x) does not make an address unknown.
    """
    return {
        rcpt: f"{code} {text}"
        for rcpt, (code, text) in refused.items()
        if enhanced_status(text) in UNKNOWN_ADDRESS_STATUSES
        and reply_verdict(code, text, rules) == "permanent"
    }


def split_refusals(
    refused: Mapping[str, tuple[int, str]], rules: Sequence[ReplyRule] = ()
) -> tuple[dict[str, tuple[int, str]], dict[str, tuple[int, str]]]:
    """Recipients a server refused while accepting others: (final, worth retrying)."""
    final: dict[str, tuple[int, str]] = {}
    later: dict[str, tuple[int, str]] = {}
    for rcpt, (code, text) in refused.items():
        permanent = reply_verdict(code, text, rules) == "permanent"
        (final if permanent else later)[rcpt] = (code, text)
    return final, later


def compute_backoff(attempt: int, base: float, maximum: float, jitter: float) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    Doubles from ``base`` up to ``maximum``; ``jitter`` in [0, 1) spreads the wait over
    its upper half so that retries of many jobs do not arrive together.
    """
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    if not 0 <= jitter < 1:
        raise ValueError("jitter is in [0, 1)")
    delay = min(maximum, base * 2.0 ** min(attempt - 1, 64))
    return delay / 2 + jitter * delay / 2


@dataclass(frozen=True)
class Decision:
    """What to do after a failed attempt: retry after ``retry_in`` seconds, or dead-letter."""

    retry_in: float | None
    reason: DeadReason | None = None


def decide(
    failure: Failure, attempt: int, max_attempts: int, base: float, maximum: float, jitter: float
) -> Decision:
    """Retry a transient failure while attempts remain; otherwise name the dead-letter reason."""
    if not failure.transient:
        return Decision(None, "permanent")
    if attempt >= max_attempts:
        return Decision(None, "attempts_exhausted")
    return Decision(compute_backoff(attempt, base, maximum, jitter))
