"""The mails the throughput benchmarks send: a job of a given size, optionally with an
attachment by path, and the very bytes mailbus puts on the wire for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from consumer.clock import utcnow
from consumer.core.content import Content, Part
from consumer.core.message import parse_job
from consumer.core.mime import WIRE_POLICY, build_message

DOMAIN = "bench.example"
SENDER = "bench@bench.example"
RECIPIENT = "sink@example.org"
# What headers and MIME framing add to a text body, near enough for "a 2 KB mail".
_FRAMING = 420


def bench_job(job_id: str, size: int, attachment: Path | None = None) -> dict[str, Any]:
    """A job whose mail is about ``size`` bytes, plus ``attachment`` (a local path)."""
    line = "mailbus benchmark text, seventy-two characters to a line, nothing more.\n"
    text = (line * (max(size - _FRAMING, 0) // len(line) + 1))[: max(size - _FRAMING, 1)]
    job: dict[str, Any] = {
        "id": job_id,
        "domain": DOMAIN,
        "from": SENDER,
        "to": [RECIPIENT],
        "subject": f"Benchmark {job_id}",
        "text": text,
    }
    if attachment is not None:
        job["attachments"] = [{"path": str(attachment), "content_type": "application/pdf"}]
    return job


def wire_bytes(job: dict[str, Any]) -> bytes:
    """The message mailbus builds for ``job``, as sent (attachments read from their path)."""
    parsed, job_id = parse_job(json.dumps(job).encode(), None)
    paths = [Path(a.path) for a in parsed.attachments if a.path is not None]
    parts = [Part(p.read_bytes(), "application/pdf", p.name) for p in paths]
    message = build_message(parsed, job_id, utcnow(), Content.of(parsed, parts))
    return message.as_bytes(policy=WIRE_POLICY)
