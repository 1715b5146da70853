"""The account every reliability scenario ends with: each job published is sent exactly
once, dead-lettered with a reason, or still scheduled; never missing, never twice.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractChannel

from consumer.amqp import dead_letters
from consumer.core.names import Names
from consumer.store.jobs import JobStore
from deploy.devstack.smtp_capture import Captured


@dataclass
class Account:
    """Where every published job ended up in one scenario."""

    scenario: str
    published: int
    sent: int = 0
    dead: int = 0
    scheduled: int = 0
    duplicated: int = 0
    missing: list[str] = field(default_factory=list)
    twice: list[str] = field(default_factory=list)
    dead_reasons: dict[str, int] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def settled(self) -> bool:
        """True when no job is missing."""
        return not self.missing


def subjects(received: Iterable[Captured]) -> Counter[str]:
    """How many times each subject (the tests use the job id) arrived."""
    return Counter(str(mail.message()["Subject"]) for mail in received)


def deliveries(received: Iterable[Captured]) -> Counter[tuple[str, str]]:
    """How many times each (subject, recipient) pair arrived: a mail retried for some of
    its recipients arrives again, for those only.
    """
    return Counter(
        (str(mail.message()["Subject"]), rcpt.lower())
        for mail in received
        for rcpt in mail.rcpt_tos
    )


async def dead_ids(channel: AbstractChannel, names: Names) -> dict[str, str]:
    """Every dead letter in the test's dead queue, taken off it: job id to reason."""
    queue = await channel.get_queue(names.dead, ensure=False)
    dead: dict[str, str] = {}
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        letter = dead_letters.read(message)
        dead[letter.job_id or "?"] = letter.reason
    return dead


async def settle(
    scenario: str,
    published: Sequence[str],
    received: Sequence[Captured],
    dead: dict[str, str],
    store: JobStore,
) -> Account:
    """Account for ``published``: from the mails the SMTP server kept, the dead letters
    and the job records (``scheduled`` ones are still waiting, which is allowed). A job
    is sent when it reached any recipient; a duplicate is a recipient reached twice.
    """
    arrived = subjects(received)
    account = Account(scenario, len(published))
    for (job_id, _), times in deliveries(received).items():
        if times > 1:
            account.twice.append(job_id)
            account.duplicated += times - 1
    for job_id in published:
        if arrived.get(job_id):
            account.sent += 1
        elif job_id in dead:
            account.dead += 1
            account.dead_reasons[dead[job_id]] = account.dead_reasons.get(dead[job_id], 0) + 1
        else:
            record = await store.get(job_id)
            if record is not None and record.get("status") == "scheduled":
                account.scheduled += 1
            else:
                account.missing.append(job_id)
    return account


def write_report(accounts: Sequence[Account], path: Path) -> None:
    """The accounts as JSON, for the reliability figures in tests/README.md."""
    path.write_text(json.dumps([asdict(a) for a in accounts], indent=2) + "\n")
