"""In-process stand-ins for the pipeline's collaborators, so that every branch of
:class:`consumer.service.pipeline.Pipeline` runs in milliseconds without a server.

Each double answers what its test sets, in the real types, and records what it was asked:
the store which records it wrote, the sender what it was handed, the suppression list who
was added. Only the pipeline's collaborators are doubled: parsing, MIME building, the
retry policy and failure classification stay real.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, cast

from pydantic import SecretStr

from consumer.core.content import Content
from consumer.core.leases import Release
from consumer.core.message import Job
from consumer.core.mime import Mail
from consumer.core.outboxes import Outbox, outbox_from_url
from consumer.core.outcomes import Outcome, SendResult
from consumer.core.ratelimit import Reservation
from consumer.core.replies import ReplyRule
from consumer.core.suppression import Scope
from consumer.core.vocabulary import DeadReason
from consumer.errors import StoreUnavailableError
from consumer.service.authorization import Authority, Authorizer
from consumer.service.compose import Composer
from consumer.service.dkim import DkimSigner
from consumer.service.picker import Choice, OutboxPicker
from consumer.service.pipeline import Pipeline
from consumer.settings import Settings
from consumer.store.documents import Document
from consumer.store.jobs import Claim, ClaimState, JobStore
from consumer.store.suppressions import SuppressionStore

# The pipeline's clock, and the store's (a little ahead, so that a test can tell them apart).
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
STORE_NOW = NOW + timedelta(seconds=1)
WORKER = "worker-1"
ACCEPTED = SendResult(250, "2.0.0 Ok: queued", {})


def offline_settings(**changes: Any) -> Settings:
    """Settings with every value the pipeline reads given here, not by the environment."""
    values: dict[str, Any] = {
        "amqp_url": "amqp://guest:guest@127.0.0.1:1/",
        "mongo_url": "mongodb://127.0.0.1:1/",
        "secret_key": None,
        "max_job_bytes": 1024 * 1024,
        "max_message_bytes": 1024 * 1024,
        "max_attempts": 3,
        "retry_base_delay": 30.0,
        "retry_max_delay": 3600.0,
        "bounce_suppression_days": 30.0,
        "throttle_seconds": 300.0,
    }
    values.update(changes)
    if isinstance(values["secret_key"], str):
        values["secret_key"] = SecretStr(values["secret_key"])
    return Settings(**values, _env_file=None)


def claimed(attempts: int = 1, **fields: Any) -> Claim:
    """The claim of a job this worker now holds, at attempt ``attempts``."""
    return Claim(ClaimState.CLAIMED, "sending", attempts, **fields)


def unavailable() -> StoreUnavailableError:
    return StoreUnavailableError("MongoDB unavailable: ServerSelectionTimeoutError")


@dataclass(frozen=True)
class Call:
    """One call the store was asked to make: its method and arguments by name."""

    name: str
    args: dict[str, Any]


class StoreDouble:
    """The job store: answers ``claim``, ``schedule`` and ``record_dead`` as set, and keeps
    every call. ``failing`` names methods that raise :class:`StoreUnavailableError`, each
    that many times before it answers.
    """

    def __init__(
        self,
        *,
        claim: Claim | None = None,
        schedule: Claim | None = None,
        record_dead: Claim | None = None,
        limit: int = 3,
        failing: dict[str, int] | None = None,
    ) -> None:
        self.claim_answer = claim or claimed()
        self.schedule_answer = schedule
        self.record_dead_answer = record_dead
        self.limit = limit
        self.failing = dict(failing or {})
        self.calls: list[Call] = []
        self.sent_accepted = True  # what mark_sent answers: False when the lease was lost

    @property
    def names(self) -> list[str]:
        """The methods called, in order (``attempt_limit`` and ``now`` are not counted)."""
        return [call.name for call in self.calls]

    def called(self, name: str) -> Document:
        """The arguments of the one call to ``name``."""
        found = [call.args for call in self.calls if call.name == name]
        assert len(found) == 1, f"{name} called {len(found)} times: {self.names}"
        return found[0]

    def _note(self, name: str, **args: Any) -> None:
        self.calls.append(Call(name, args))
        if self.failing.get(name, 0) > 0:
            self.failing[name] -= 1
            raise unavailable()

    def now(self) -> datetime:
        return STORE_NOW

    def attempt_limit(self, job: Job) -> int:
        return job.max_attempts or self.limit

    async def claim(
        self,
        job_id: str,
        job: Job,
        worker_id: str,
        recorded: bool = False,
        release: Release | None = None,
        ahead: bool = False,
    ) -> Claim:
        self._note(
            "claim",
            job_id=job_id,
            domain=job.domain,
            worker_id=worker_id,
            recorded=recorded,
            release=release,
            ahead=ahead,
        )
        return self.claim_answer

    async def schedule(self, job_id: str, job: Job, body: bytes, due_at: datetime) -> Claim:
        self._note("schedule", job_id=job_id, domain=job.domain, body=body, due_at=due_at)
        if self.schedule_answer is not None:
            return self.schedule_answer
        return Claim(ClaimState.SCHEDULED, "scheduled", 0, due_at=due_at)

    async def record_dead(
        self, job_id: str, domain: str, reason: DeadReason, error: str
    ) -> Claim | None:
        self._note("record_dead", job_id=job_id, domain=domain, reason=reason, error=error)
        return self.record_dead_answer

    async def mark_sent(
        self,
        job_id: str,
        worker_id: str,
        reply: Document,
        refused: dict[str, Document],
        outbox: str | None = None,
        details: Document | None = None,
    ) -> bool:
        self._note(
            "mark_sent",
            job_id=job_id,
            worker_id=worker_id,
            reply=reply,
            refused=refused,
            outbox=outbox,
            details=details,
        )
        return self.sent_accepted

    async def mark_retry(
        self,
        job_id: str,
        worker_id: str,
        error: str,
        due_at: datetime,
        body: bytes,
        outbox: str | None = None,
        partial: tuple[list[str], Document] | None = None,
        reply: Document | None = None,
    ) -> None:
        self._note(
            "mark_retry",
            job_id=job_id,
            worker_id=worker_id,
            error=error,
            due_at=due_at,
            body=body,
            outbox=outbox,
            partial=partial,
            reply=reply,
        )

    async def mark_throttled(
        self,
        job_id: str,
        worker_id: str,
        reservation: Reservation,
        due_at: datetime,
        body: bytes,
    ) -> None:
        self._note(
            "mark_throttled",
            job_id=job_id,
            worker_id=worker_id,
            reservation=reservation,
            due_at=due_at,
            body=body,
        )

    async def mark_failed(
        self,
        job_id: str,
        worker_id: str,
        status: Literal["failed", "dead"],
        reason: DeadReason,
        error: str,
        details: Document | None = None,
        outbox: str | None = None,
        reply: Document | None = None,
    ) -> None:
        self._note(
            "mark_failed",
            job_id=job_id,
            worker_id=worker_id,
            status=status,
            reason=reason,
            error=error,
            details=details,
            outbox=outbox,
            reply=reply,
        )


@dataclass(frozen=True)
class Handed:
    """One hand-over to the SMTP server: the built mail and its envelope."""

    mail: Mail
    sender: str
    recipients: list[str]


class SenderDouble:
    """An outbox's connection pool (the :class:`~consumer.mail.transport.Sender`
    protocol): answers each send with the next of ``replies`` (a reply, or an exception
    to raise), then with a plain 250. ``gate``, when set, holds every send until it opens.
    """

    def __init__(
        self,
        outbox: Outbox | None = None,
        replies: Iterable[SendResult | Exception] = (),
        gate: asyncio.Event | None = None,
    ) -> None:
        self.outbox = outbox or outbox_from_url("smtp://127.0.0.1:2525", name="o1")
        self.replies: deque[SendResult | Exception] = deque(replies)
        self.gate = gate
        self.handed: list[Handed] = []
        self.started = asyncio.Event()  # set once a send has begun
        self.closed = False

    @property
    def connections(self) -> int:
        return 0

    async def send(self, mail: Mail, sender: str, recipients: list[str]) -> SendResult:
        self.handed.append(Handed(mail, sender, list(recipients)))
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        reply = self.replies.popleft() if self.replies else ACCEPTED
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def close(self) -> None:
        self.closed = True


class PickerDouble:
    """The outbox picker: ``choose`` answers ``choice`` (or raises it), ``reserved``
    answers ``reserved_choice``, ``sandbox`` answers ``sandbox_choice`` (or raises it);
    each keeps what it was asked.
    """

    def __init__(
        self,
        choice: Choice | Exception | None = None,
        *,
        reserved_choice: Choice | None = None,
        sandbox_choice: Choice | Exception | None = None,
    ) -> None:
        self.choice = choice
        self.reserved_choice = reserved_choice
        self.sandbox_choice = sandbox_choice
        self.chosen: list[tuple[str, str | None]] = []
        self.asked_reserved: list[Reservation] = []
        self.asked_sandbox: list[str] = []
        self.rules: dict[str, tuple[ReplyRule, ...]] = {}  # each provider's reply rules
        self.slowed: list[tuple[str, float]] = []

    async def choose(self, domain: str, avoid: str | None = None) -> Choice | None:
        self.chosen.append((domain, avoid))
        if isinstance(self.choice, Exception):
            raise self.choice
        return self.choice

    async def reserved(self, reservation: Reservation) -> Choice | None:
        self.asked_reserved.append(reservation)
        return self.reserved_choice

    async def reply_rules(self, provider: str) -> tuple[ReplyRule, ...]:
        return self.rules.get(provider, ())

    async def slow(self, provider: str, seconds: float) -> datetime | None:
        self.slowed.append((provider, seconds))
        return NOW + timedelta(seconds=seconds)

    async def sandbox(self, name: str) -> Choice:
        self.asked_sandbox.append(name)
        if self.sandbox_choice is None:
            raise AssertionError(f"no sandbox choice set for {name!r}")
        if isinstance(self.sandbox_choice, Exception):
            raise self.sandbox_choice
        return self.sandbox_choice


class AuthorizerDouble:
    """Refuses every job with ``refusal`` when it is set, or raises ``error``; keeps the
    authorities asked about. Every domain is registered as ``registration`` (None: open).
    """

    def __init__(
        self,
        refusal: str | None = None,
        error: Exception | None = None,
        registration: Document | None = None,
    ) -> None:
        self.refusal_text = refusal
        self.error = error
        self.registration = registration
        self.asked: list[tuple[str, Authority]] = []

    async def refusal(self, job: Job, authority: Authority) -> str | None:
        self.asked.append((job.domain, authority))
        if self.error is not None:
            raise self.error
        return self.refusal_text

    async def domain(self, name: str) -> Document | None:
        return self.registration


class ComposerDouble:
    """The job's own content (or ``content``), or raises ``error``; counts its calls."""

    def __init__(self, content: Content | None = None, error: Exception | None = None) -> None:
        self.content = content
        self.error = error
        self.composed = 0

    async def compose(self, job: Job) -> Content:
        self.composed += 1
        if self.error is not None:
            raise self.error
        return self.content or Content.of(job)


class SuppressionsDouble:
    """The suppression list: ``suppressed`` (lower-cased addresses, suppressed for every
    domain), and the automatic entries added as (address to reason, scope, source, days);
    ``failing`` makes ``add_automatic`` find MongoDB away.
    """

    def __init__(self, suppressed: Iterable[str] = (), *, failing: bool = False) -> None:
        self.suppressed = {a.lower() for a in suppressed}
        self.failing = failing
        self.added: list[tuple[dict[str, str], Scope, str, float | None]] = []
        self.asked: list[tuple[str, str | None]] = []

    async def among(
        self, addresses: Iterable[str], *, domain: str, list_name: str | None = None
    ) -> set[str]:
        self.asked.append((domain, list_name))
        return {a.lower() for a in addresses} & self.suppressed

    async def add_automatic(
        self,
        reasons: Mapping[str, str],
        *,
        scope: Scope,
        source: str,
        days: float | None = None,
    ) -> None:
        self.added.append((dict(reasons), scope, source, days))
        if self.failing:
            raise unavailable()


class SignerDouble:
    """DKIM signing: no domain has a key, so mail goes as it was built."""

    async def sign(self, mail: Mail, domain: str) -> Mail:
        return mail


@dataclass
class Rig:
    """A real :class:`Pipeline` on doubles; its clock reads :data:`NOW` and its retry
    jitter is 0, so every due time is exact.
    """

    store: StoreDouble = field(default_factory=StoreDouble)
    sender: SenderDouble = field(default_factory=SenderDouble)
    picker: PickerDouble | None = None
    authorizer: AuthorizerDouble = field(default_factory=AuthorizerDouble)
    composer: ComposerDouble = field(default_factory=ComposerDouble)
    suppressions: SuppressionsDouble = field(default_factory=SuppressionsDouble)
    settings: Settings = field(default_factory=offline_settings)

    def __post_init__(self) -> None:
        if self.picker is None:
            self.picker = PickerDouble(Choice(self.sender))
        self.pipeline = Pipeline(
            settings=self.settings,
            store=cast(JobStore, self.store),
            picker=cast(OutboxPicker, self.picker),
            authorizer=cast(Authorizer, self.authorizer),
            composer=cast(Composer, self.composer),
            suppressions=cast(SuppressionStore, self.suppressions),
            signer=cast(DkimSigner, SignerDouble()),
            worker_id=WORKER,
            clock=lambda: NOW,
            jitter=lambda: 0.0,
        )

    async def process(
        self,
        body: bytes,
        message_id: str | None = "job-1",
        headers: dict[str, Any] | None = None,
        authority: Authority | None = None,
    ) -> Outcome:
        return await self.pipeline.process(body, message_id, headers or {}, authority)
