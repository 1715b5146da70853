"""Sandbox mode, for staging and CI: which jobs are sandboxed, and what a sandboxed mail
that is not delivered is answered.

A sandboxed job goes every step a production job goes (authorized, rendered, recorded,
announced) except the hand-over to the recipients' relay: it is not delivered at all, or
only to the catch-all outbox ``MAILBUS_SANDBOX_OUTBOX`` names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from consumer.core.message import Job
from consumer.core.outcomes import SendResult

# What the record and ``mail.sent`` say of a sandboxed mail no server was given: the
# contract's SMTP reply, in words no real server would use.
NOT_DELIVERED = SendResult(250, "sandbox: accepted, not delivered", {})


def sandboxed(job: Job, registration: Mapping[str, Any] | None) -> bool:
    """Whether ``job`` is sandboxed: its own ``sandbox`` flag, or its domain's
    (``registration``, None for an open domain; `mailbus domain sandbox`).
    """
    return job.sandbox or bool(registration and registration.get("sandbox"))
