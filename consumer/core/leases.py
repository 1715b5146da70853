"""Letting go of a lease when MongoDB fails in the middle of a job.

A worker claims a job by writing a lease on its record. When MongoDB stops answering
midway, the worker cannot tell whether its claim was written, nor give the lease back; it
puts the job back in the ladder with a *release*: its worker id and the moment it let go.
The copy may then take that lease over at once, whoever receives it, rather than wait
the lease out. It is safe because any later move by that worker on the job (another
delivery of it claiming, say) would have stamped the record after the release.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from consumer.core.headers import RELEASED_AT_HEADER, RELEASED_BY_HEADER
from consumer.core.schedule import to_epoch_ms


@dataclass(frozen=True)
class Release:
    """Worker ``worker`` let go, at ``at`` on its own clock, of any lease it held."""

    worker: str
    at: datetime

    def headers(self) -> dict[str, Any]:
        """The release as the headers of the job's next copy."""
        return {RELEASED_BY_HEADER: self.worker, RELEASED_AT_HEADER: to_epoch_ms(self.at)}


def released(headers: Mapping[str, Any]) -> Release | None:
    """The release a copy carries, if it carries a well-formed one."""
    worker, at = headers.get(RELEASED_BY_HEADER), headers.get(RELEASED_AT_HEADER)
    if isinstance(worker, bytes):
        worker = worker.decode("utf-8", "replace")
    if not isinstance(worker, str) or not worker or not isinstance(at, int) or at < 0:
        return None
    return Release(worker, datetime.fromtimestamp(at / 1000, UTC))
