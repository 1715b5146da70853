"""Hostile job bodies against the parser and the MIME builder: whatever comes in, the
answer is a message that goes on the wire as it should, or a dead-letter error with a
reason; never another exception (which would be a worker bug).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from email import policy
from email.parser import BytesParser
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from consumer.content import Content
from consumer.errors import DeadLetterError
from consumer.message import parse_job
from consumer.mime import build_message, serialize

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
LIMIT = 10 * 1024 * 1024
# Strings that tend to break mail: line breaks for header injection, NULs, lone
# surrogates' neighbours, IDN, quoted local parts, very long words.
NASTY = st.sampled_from(
    [
        "",
        "a\r\nBcc: victim@example.org",
        "a\nX-Injected: yes",
        "x\r\n\r\nbody",
        "\x00",
        "é" * 80,
        "ü@bücher.example",
        '"quoted local"@example.org',
        '"a\\"b"@example.org',
        "a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 63 + "." + "e" * 57,
        "x" * 5000,
        "=?utf-8?b?PGI+?=",
        "<script>",
        "user@[127.0.0.1]",
        "user@localhost",
        "@example.org",
        "user@",
        "Name <user@example.org>",
    ]
)
TEXT = st.one_of(NASTY, st.text(max_size=300))
ADDRESS = st.one_of(
    NASTY, st.emails(), st.builds(lambda a, b: f"{a}@{b}", st.text(max_size=70), TEXT)
)
JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT)
JSON = st.recursive(
    JSON_SCALAR,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=20,
)


def job_like() -> st.SearchStrategy[dict[str, Any]]:
    """Bodies shaped like jobs, each field maybe wrong."""
    return st.fixed_dictionaries(
        {
            "domain": st.one_of(st.just("example.com"), TEXT),
            "from": st.one_of(ADDRESS, st.fixed_dictionaries({"email": ADDRESS, "name": TEXT})),
            "to": st.lists(st.one_of(ADDRESS, JSON), min_size=0, max_size=4),
        },
        optional={
            "subject": st.one_of(TEXT, JSON),
            "text": TEXT,
            "html": TEXT,
            "cc": st.lists(ADDRESS, max_size=3),
            "reply_to": ADDRESS,
            "headers": st.dictionaries(st.one_of(NASTY, st.text(max_size=20)), TEXT, max_size=3),
            "charset": st.one_of(st.sampled_from(["iso-8859-1", "us-ascii", "koi8-r"]), TEXT),
            "attachments": st.lists(JSON, max_size=2),
            "send_at": st.one_of(TEXT, st.just("2026-01-01T00:00:00Z")),
            "metadata": JSON,
            "id": TEXT,
        },
    )


def check(body: bytes) -> None:
    """Run ``body`` as far as the worker would without I/O; only dead-letter errors may
    come out, and a message that is built must be safe on the wire.
    """
    try:
        job, job_id = parse_job(body, None)
        charset = job.charset or "utf-8"
        mail = serialize(build_message(job, job_id, NOW, Content.of(job), charset), LIMIT)
    except DeadLetterError as exc:
        refusal: DeadLetterError | None = exc
    else:
        refusal = None
    if refusal is not None:  # dead-lettered, with a reason and a message an operator reads
        assert refusal.reason
        assert str(refusal)
        return
    assert all(len(line) <= 998 for line in mail.wire.split(b"\r\n"))
    assert b"\n" not in mail.wire.replace(b"\r\n", b"")
    parsed = BytesParser(policy=policy.default).parsebytes(mail.wire)
    expected = {"from", "to", "subject", "date", "message-id", "mime-version"}
    expected |= {"content-type", "content-transfer-encoding"}
    expected |= {"cc"} if job.cc else set()
    expected |= {"reply-to"} if job.reply_to else set()
    expected |= {name.lower() for name in job.headers}
    # No line break in a value ever becomes a header of its own (header injection).
    assert {name.lower() for name in parsed} == expected
    assert "victim@example.org" not in str(parsed.get("bcc", ""))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
@example(b"\xff\xfe{}")
@example(b'{"domain": "example.com"' * 1000)
def test_random_bytes(body: bytes) -> None:
    check(body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(JSON)
@example([[[[[[[[[[[]]]]]]]]]]])
def test_random_json(value: Any) -> None:
    check(json.dumps(value).encode())


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(job_like())
def test_job_shaped_bodies(body: dict[str, Any]) -> None:
    check(json.dumps(body).encode())


def test_deep_nesting_is_refused_not_a_crash() -> None:
    body = b'{"metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    check(body)
