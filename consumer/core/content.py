"""What a job's mail says, gathered before the message is built: subject, bodies, parts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from consumer.core.message import Job


@dataclass(frozen=True)
class Part:
    """An attachment's bytes and how to label them; ``cid`` is set for inline images."""

    data: bytes
    content_type: str
    filename: str | None
    cid: str | None = None


@dataclass(frozen=True)
class Content:
    """Everything :func:`consumer.core.mime.build_message` needs besides the job's headers."""

    subject: str
    text: str | None
    html: str | None
    parts: tuple[Part, ...] = ()
    # The stored template rendered, as (name, version).
    template: tuple[str, int] | None = None

    @classmethod
    def of(cls, job: Job, parts: Sequence[Part] = ()) -> Content:
        """The content a job without a template spells out itself."""
        return cls(job.subject, job.text, job.html, tuple(parts))
