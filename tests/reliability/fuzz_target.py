"""What a fuzzed job body may do: become a message that goes on the wire as it should, or
a dead-letter error with a reason; never another exception (which would be a worker bug).
Shared by the hypothesis tests and the atheris run.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email import policy
from email.parser import BytesParser

from consumer.core.content import Content
from consumer.core.message import parse_job
from consumer.core.mime import build_message, serialize
from consumer.core.refusals import DeadLetterError

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
LIMIT = 10 * 1024 * 1024


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
    expected |= {"content-type"} | (
        set() if parsed.is_multipart() else {"content-transfer-encoding"}
    )
    expected |= {"cc"} if job.cc else set()
    expected |= {"reply-to"} if job.reply_to else set()
    expected |= {name.lower() for name in job.headers}
    # No line break in a value ever becomes a header of its own (header injection).
    assert {name.lower() for name in parsed} == expected
    assert "victim@example.org" not in str(parsed.get("bcc", ""))
