"""What an SMTP reply means: its codes (RFC 5321 and the RFC 3463 enhanced code), then a
provider's reply rules; and the slowed buckets of a provider that throttles.
"""

from __future__ import annotations

from datetime import UTC, datetime

import aiosmtplib
import pytest

from consumer.core.ratelimit import MICROS, Bucket, Limit, take, tokens_left
from consumer.core.replies import MAX_RULES, ReplyRule, parse_rule, parse_rules
from consumer.core.retry import reply_verdict, split_refusals, unknown_recipients
from consumer.core.vocabulary import ReplyVerdict
from consumer.errors import ConfigurationError
from consumer.mail.failures import classify
from consumer.store.providers import slowdown_of, tokens_of


# The codes alone: the enhanced code agrees with the basic one, or the transient one of
# the two wins; 421 and 4.7.x are throttles.
@pytest.mark.parametrize(
    ("code", "text", "verdict"),
    [
        (451, "4.3.0 try again later", "transient"),
        (450, "mailbox busy", "transient"),
        (452, "4.2.2 mailbox full", "transient"),
        (421, "closing connection", "throttle"),
        (421, "4.3.2 shutting down", "throttle"),
        (450, "4.7.1 too many messages, slow down", "throttle"),
        (550, "5.1.1 no such user", "permanent"),
        (554, "rejected", "permanent"),
        (550, "5.7.1 rate limited", "permanent"),  # no rule: the codes say permanent
        (550, "4.2.0 try later", "transient"),  # they disagree: the transient one wins
        (554, "4.7.0 too fast", "throttle"),
        (451, "5.7.1 policy", "transient"),
        (550, "temporary, try again later", "permanent"),  # prose never decides
    ],
)
def test_the_codes_decide_without_rules(code: int, text: str, verdict: ReplyVerdict) -> None:
    assert reply_verdict(code, text) == verdict


RULES = parse_rules(
    [
        "transient: 550 5.7.1 rate limited",
        "throttle: 5.7.28",
        "permanent: 452 over quota",
        "transient: 5.2",
    ]
)


@pytest.mark.parametrize(
    ("code", "text", "verdict"),
    [
        (550, "5.7.1 Rate Limited, try later", "transient"),  # text case-insensitive
        (550, "5.7.1 spam", "permanent"),  # the text is part of the match
        (554, "5.7.1 rate limited", "permanent"),  # so is the basic code
        (550, "5.7.28 unusual rate of mail", "throttle"),
        (550, "5.7.2 rate limited", "permanent"),  # 5.7.28 is not 5.7.2, nor the reverse
        (452, "4.2.2 over quota for today", "permanent"),
        (552, "5.2.2 mailbox full", "transient"),  # by the enhanced code's first two parts
        (421, "4.7.0 closing", "throttle"),  # no rule matches: the codes decide
    ],
)
def test_the_first_matching_rule_decides(code: int, text: str, verdict: ReplyVerdict) -> None:
    assert reply_verdict(code, text, RULES) == verdict


@pytest.mark.parametrize(
    "written",
    [
        "transient: 550 5.7.1 rate limited",
        "throttle: 4.7",
        "permanent: 452",
        "transient: 5 quota",
    ],
)
def test_rules_are_read_back_as_written(written: str) -> None:
    assert str(parse_rule(written)) == written


def test_a_rules_parts() -> None:
    assert parse_rule(" Throttle :  421   4.7.0  Slow   Down ") == ReplyRule(
        "throttle", 421, "4.7.0", "slow down"
    )


@pytest.mark.parametrize(
    ("written", "problem"),
    [
        ("550 5.7.1", "looks like"),
        ("retry: 550", "looks like"),
        ("transient: rate limited", "names a code or an enhanced code"),
        ("transient:", "names a code or an enhanced code"),
        ("transient: 550 " + "x" * 101, "at most 100"),
        ("transient: 550 a\x00b", "printable"),
    ],
)
def test_bad_rules_are_refused(written: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        parse_rule(written)


def test_rules_are_bounded() -> None:
    parse_rules(["permanent: 550"] * MAX_RULES)
    with pytest.raises(ConfigurationError, match=f"at most {MAX_RULES}"):
        parse_rules(["permanent: 550"] * (MAX_RULES + 1))


def test_failures_are_classified_under_the_rules() -> None:
    limited = aiosmtplib.SMTPDataError(550, "5.7.1 rate limited")
    assert not classify(limited).transient
    assert classify(limited, RULES).transient
    assert not classify(limited, RULES).throttle
    slow = aiosmtplib.SMTPRecipientsRefused(
        [
            aiosmtplib.SMTPRecipientRefused(550, "5.1.1 unknown", "a@b.c"),
            aiosmtplib.SMTPRecipientRefused(450, "4.7.1 slow down", "d@b.c"),
        ]
    )
    assert (classify(slow).transient, classify(slow).throttle, classify(slow).code) == (
        True,
        True,
        450,
    )


def test_refusals_are_split_and_suppressed_under_the_rules() -> None:
    rules = parse_rules(["transient: 5.1.1 try later"])
    refused = {"a@x.org": (550, "5.1.1 try later"), "b@x.org": (550, "5.1.1 no such user")}
    final, later = split_refusals(refused, rules)
    assert (list(final), list(later)) == (["b@x.org"], ["a@x.org"])
    assert list(unknown_recipients(refused, rules)) == ["b@x.org"]


def test_a_slowed_bucket_hands_out_tokens_half_as_often() -> None:
    limits, now = [Limit(10, 1)], 1_000 * MICROS
    normal, _ = take(limits, 1, [Bucket()], now, "enqueue", count=3)
    slowed, _ = take(limits, 1, [Bucket()], now, "enqueue", count=3, slowdown=2)
    assert [g.slot_us - now for g in normal] == [0, 100_000, 200_000]
    assert [g.slot_us - now for g in slowed] == [0, 200_000, 400_000]


def test_a_slowdown_just_after_a_burst_lets_nothing_more_through() -> None:
    # The provider says "too fast" as a burst empties its bucket: slowing it must not
    # widen the burst's slack into more sends at once.
    limits, now = [Limit(10, 1)], 1_000 * MICROS
    burst, buckets = take(limits, 5, [Bucket()], now, "try", count=5)
    assert all(g.granted for g in burst)
    slowed, _ = take(limits, 5, buckets, now, "try", count=3, slowdown=2)
    assert not any(g.granted for g in slowed)
    assert tokens_left(limits[0], 5, buckets[0], now, slowdown=2) == 0
    # After a quiet spell the slowed bucket lets through what fits in the burst's time.
    quiet = now + 10 * MICROS
    later, _ = take(limits, 5, buckets, quiet, "try", count=5, slowdown=2)
    assert [g.granted for g in later] == [True] * 3 + [False] * 2
    assert tokens_left(limits[0], 5, buckets[0], quiet, slowdown=2) == 3
    assert tokens_left(limits[0], 5, buckets[0], quiet) == 5


def test_a_provider_is_slowed_until_its_stored_time() -> None:
    until = datetime(2030, 1, 1, tzinfo=UTC)
    doc = {"_id": "p", "burst": 1, "limits": [], "slowed_until": int(until.timestamp() * MICROS)}
    before, after = datetime(2029, 12, 31, tzinfo=UTC), datetime(2030, 1, 2, tzinfo=UTC)
    assert (slowdown_of(doc, before), slowdown_of(doc, after)) == (2, 1)
    assert tokens_of(doc, before)["slowdown"] == 2
    assert slowdown_of({"_id": "q"}, before) == 1
