"""Operators' rules for one provider's SMTP replies: which replies mean something other
than their codes say (a ``550 5.7.1`` that is only a rate limit, say).

A rule is written ``VERDICT: [CODE] [X.Y.Z] [TEXT]``: ``transient: 550 5.7.1 rate limited``,
``throttle: 4.7.0``, ``permanent: 452``. It matches a reply whose basic code is ``CODE``,
whose enhanced status code (RFC 3463) is ``X.Y.Z`` or starts with ``X`` or ``X.Y``, and
whose text holds ``TEXT`` (case-insensitively); it names a code or an enhanced code at
least, so prose alone never decides. The first rule that matches wins (see
:func:`consumer.core.retry.reply_verdict`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from consumer.core.vocabulary import REPLY_VERDICTS, ReplyVerdict
from consumer.errors import ConfigurationError

MAX_RULES = 20  # per provider: each failed send tries them in order
MAX_TEXT = 100  # characters of a rule's text
_CODE = re.compile(r"^[2-5]\d\d$")
_STATUS = re.compile(r"^[245](?:\.\d{1,3}){0,2}$")
_VERDICTS: dict[str, ReplyVerdict] = {verdict: verdict for verdict in REPLY_VERDICTS}


@dataclass(frozen=True)
class ReplyRule:
    """Replies matching ``code``, ``status`` and ``text`` (each when given) mean ``verdict``."""

    verdict: ReplyVerdict
    code: int | None = None
    status: str | None = None  # an enhanced status code, or its first one or two parts
    text: str | None = None  # lower case

    def matches(self, code: int, status: str | None, text: str) -> bool:
        """Whether the reply ``code`` ``text``, whose enhanced code is ``status``, matches."""
        if self.code is not None and code != self.code:
            return False
        if self.status is not None:
            parts = self.status.split(".")
            if status is None or status.split(".")[: len(parts)] != parts:
                return False
        return self.text is None or self.text in text.lower()

    def __str__(self) -> str:
        match = [str(self.code) if self.code else None, self.status, self.text]
        return f"{self.verdict}: " + " ".join(part for part in match if part)


def parse_rule(written: str) -> ReplyRule:
    """A rule from its written form (see the module's docstring); a bad one raises
    :class:`ConfigurationError` saying why.
    """
    said, colon, match = written.partition(":")
    verdict = _VERDICTS.get(said.strip().lower())
    if not colon or verdict is None:
        raise ConfigurationError(
            f"a reply rule looks like 'transient: 550 5.7.1 rate limited' (verdicts: "
            f"{', '.join(REPLY_VERDICTS)}), not {written!r}"
        )
    words = match.split()
    code = status = None
    if words and _CODE.match(words[0]):
        code = int(words.pop(0))
    if words and _STATUS.match(words[0]):
        status = words.pop(0)
    text = " ".join(words).lower() or None
    if code is None and status is None:
        raise ConfigurationError(f"a reply rule names a code or an enhanced code: {written!r}")
    if text is not None and (len(text) > MAX_TEXT or not text.isprintable()):
        raise ConfigurationError(
            f"a reply rule's text is at most {MAX_TEXT} printable characters: {written!r}"
        )
    return ReplyRule(verdict, code, status, text)


def parse_rules(written: Sequence[str]) -> tuple[ReplyRule, ...]:
    """Every rule of a provider, at most :data:`MAX_RULES`."""
    if len(written) > MAX_RULES:
        raise ConfigurationError(f"a provider has at most {MAX_RULES} reply rules")
    return tuple(parse_rule(text) for text in written)


def rules_of(stored: Any) -> tuple[ReplyRule, ...]:
    """The rules a provider document's ``replies`` field holds (their written forms)."""
    return parse_rules([str(text) for text in stored or ()])
