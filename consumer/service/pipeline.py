"""What happens to one job, from the bytes of a delivery to an :data:`Outcome`.

Every durable MongoDB write a job causes happens here, before the outcome is returned;
the worker then carries the outcome out on the broker and acknowledges the delivery.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import structlog

from consumer.clock import utcnow
from consumer.core.content import Content
from consumer.core.headers import DUE_HEADER
from consumer.core.leases import Release
from consumer.core.message import Job, parse_job
from consumer.core.mime import Mail, build_mail, raw_mail
from consumer.core.outcomes import (
    Context,
    Crashed,
    Dead,
    Failure,
    Later,
    Outcome,
    SendResult,
    Sent,
    Skip,
)
from consumer.core.refusals import DeadLetterError, InvalidJobError
from consumer.core.replies import ReplyRule
from consumer.core.retry import (
    Decision,
    decide,
    reply_verdict,
    split_refusals,
    unknown_recipients,
)
from consumer.core.returns import ReturnPaths, own_bounce_domain
from consumer.core.sandbox import NOT_DELIVERED, sandboxed
from consumer.core.schedule import CLAIM_AHEAD, due_time
from consumer.core.suppression import Scope
from consumer.core.unsubscribe import link_headers
from consumer.core.vocabulary import DeadReason, final_status
from consumer.errors import AttachmentUnavailableError, ConfigurationError, StoreUnavailableError
from consumer.logging import get_logger
from consumer.mail.failures import classify
from consumer.mail.transport import Sender
from consumer.service.authorization import Authority, Authorizer, without_domain_key
from consumer.service.compose import Composer
from consumer.service.dkim import DkimSigner
from consumer.service.picker import Choice, OutboxPicker, Throttle
from consumer.settings import Settings
from consumer.store.documents import Document
from consumer.store.jobs import (
    DUE_TOLERANCE,
    Claim,
    ClaimState,
    JobStore,
    exhausted_error,
    smtp_reply,
)
from consumer.store.suppressions import SuppressionStore
from consumer.vault import Vault

log = get_logger(__name__)
Written = TypeVar("Written")
STORE_RETRY = timedelta(seconds=5)


@dataclass
class Attempt:
    """A claimed job on its way to the SMTP server: what each step after the claim reads,
    and what the steps learn (the context its outcome reports, the record's extra fields:
    suppressed recipients, the template used).
    """

    job_id: str
    job: Job
    body: bytes  # what records and copies keep of the delivery: never its key once sealed
    now: datetime  # the mail's Date: when it is sent (its due time, once claimed ahead)
    claim: Claim
    ctx: Context
    details: Document = field(default_factory=dict)
    send_at: datetime | None = None  # claimed ahead: not handed over before this
    rules: tuple[ReplyRule, ...] | None = None  # the provider's, once a reply needed them
    added: dict[str, str] = field(default_factory=dict)  # headers mailbus adds: unsubscribe


class Pipeline:
    """Turns one delivery into an outcome: parse, schedule, claim, build, send, record."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: JobStore,
        picker: OutboxPicker,
        authorizer: Authorizer,
        composer: Composer,
        suppressions: SuppressionStore,
        signer: DkimSigner,
        worker_id: str,
        vault: Vault | None = None,
        clock: Callable[[], datetime] = utcnow,
        jitter: Callable[[], float] = random.random,
        returns: ReturnPaths | None = None,
    ) -> None:
        """``returns``: the return addresses, at MAILBUS_BOUNCE_DOMAIN or at a domain's own
        bounce domain (None without MAILBUS_SECRET_KEY, which signs them).
        """
        self.settings = settings
        self.store = store
        self.picker = picker
        self.authorizer = authorizer
        self.composer = composer
        self.suppressions = suppressions
        self.signer = signer
        self.worker_id = worker_id
        self.clock = clock
        self.jitter = jitter
        self.vault = vault  # MAILBUS_SECRET_KEY's: signs unsubscribe links
        self.returns = returns
        self._sending: set[str] = set()

    def leases_held(self) -> frozenset[str]:
        """The jobs this worker is sending now: their leases must not run out meanwhile."""
        return frozenset(self._sending)

    async def process(
        self,
        body: bytes,
        message_id: str | None,
        headers: Mapping[str, Any],
        authority: Authority | None = None,
        *,
        claim_ahead: bool = False,
    ) -> Outcome:
        """Run the job in ``body`` as far as it can go now; ``authority`` is what the
        delivery speaks for beyond its body: the broker user that published it, and on a
        worker's copy the domain it was authorized for and a released lease (see
        :mod:`consumer.service.authorization`). With ``claim_ahead`` (a job held until
        its time) one due within :data:`CLAIM_AHEAD` is claimed now and sent at its time.
        """
        authority = authority or Authority()
        now = self.clock()
        try:
            job, job_id = parse_job(
                body,
                message_id,
                max_bytes=self.settings.max_job_bytes,
                max_message_bytes=self.settings.max_message_bytes,
                special_use=self.settings.allow_special_use_domains,
            )
            due = due_time(job, headers, now)
        except InvalidJobError as exc:
            return Dead(Context(message_id), exc.reason, str(exc))
        structlog.contextvars.bind_contextvars(job_id=job_id, domain=job.domain)
        ctx = Context(job_id, job)
        try:
            refusal = await self.authorizer.refusal(job, authority)
            # The domain's registration is the one authorization just read (kept a while).
            registration = await self.authorizer.domain(job.domain)
            ctx = dataclasses.replace(
                ctx,
                sandbox=sandboxed(job, registration),
                bounce_domain=own_bounce_domain(registration),
            )
            if refusal is not None:  # nothing is recorded for a job nobody may send
                return Dead(ctx, "unauthorized", refusal)
            ctx = dataclasses.replace(ctx, authorized=True)
            # What is kept of the body from here on (records, copies): never its key,
            # once a seal can carry its authorization instead.
            if self.settings.secret_key is not None:
                body = without_domain_key(body)
            if due is not None and due > now + DUE_TOLERANCE:
                if claim_ahead and due <= now + CLAIM_AHEAD + DUE_TOLERANCE:
                    return await self._claim_and_send(
                        ctx, job_id, job, body, now, headers, authority, send_at=due
                    )
                if DUE_HEADER in headers:  # a copy back early: its record was written before
                    return Later(ctx, due, "waiting")
                return await self._schedule(ctx, job_id, job, body, due)
            return await self._claim_and_send(ctx, job_id, job, body, now, headers, authority)
        except StoreUnavailableError as exc:
            return _store_failed(ctx, exc, self.clock())

    async def _schedule(
        self, ctx: Context, job_id: str, job: Job, body: bytes, due: datetime
    ) -> Outcome:
        try:
            claim = await self.store.schedule(job_id, job, body, due)
        except StoreUnavailableError as exc:
            # The due time travels with the message, so the mail still goes out on time;
            # only listing it waits for MongoDB (a cancel by id works regardless).
            log.warning("job.scheduled_without_record", error=str(exc))
            return Later(ctx, due, "scheduled")
        if claim.state is ClaimState.SCHEDULED:
            return Later(ctx, due, "scheduled")
        return _not_claimed(ctx, claim)

    async def _claim_and_send(
        self,
        ctx: Context,
        job_id: str,
        job: Job,
        body: bytes,
        now: datetime,
        headers: Mapping[str, Any],
        authority: Authority,
        send_at: datetime | None = None,
    ) -> Outcome:
        now = send_at or now  # claimed ahead: the job is judged and dated at its time
        if job.expires_at is not None and job.expires_at <= now:
            error = f"expired at {job.expires_at.isoformat()}"
            found = await self.store.record_dead(job_id, job.domain, "expired", error)
            if found is not None:
                return _not_claimed(ctx, found)
            return Dead(ctx, "expired", error)
        # Only the delivery that is this worker's one sending the job may let go of its
        # lease when MongoDB fails; a duplicate delivery meanwhile never does.
        own = job_id not in self._sending
        if own:
            self._sending.add(job_id)
        try:
            # A copy back from the ladder (due, or a retry) has a record already.
            recorded = DUE_HEADER in headers
            claim = await self.store.claim(
                job_id, job, self.worker_id, recorded, authority.release, ahead=send_at is not None
            )
            if claim.state is not ClaimState.CLAIMED:
                return _not_claimed(ctx, claim)
            structlog.contextvars.bind_contextvars(attempt=claim.attempts)
            ctx = dataclasses.replace(ctx, attempts=claim.attempts)
            return await self._deliver(Attempt(job_id, job, body, now, claim, ctx, send_at=send_at))
        except StoreUnavailableError as exc:
            if not own:
                raise
            # On the store's clock, the one that stamps the record's updated_at.
            release = Release(self.worker_id, self.store.now())
            return _store_failed(ctx, exc, self.clock(), release)
        finally:
            if own:
                self._sending.discard(job_id)

    async def _deliver(self, attempt: Attempt) -> Outcome:
        """The steps of a claimed job: its recipients, its message, an outbox, the
        hand-over.
        """
        if attempt.ctx.sandbox:
            attempt.details["sandbox"] = True
        recipients = await self._recipients(attempt)
        if not recipients:
            suppressed = ", ".join(attempt.details.get("suppressed", ()))
            return await self._dead(
                attempt, "suppressed", f"every recipient is suppressed: {suppressed}"
            )
        # Built before the outbox is chosen: a token is taken as close to the send as can
        # be, and a message that can never be sent takes none.
        content: Content | None = None  # a raw job's message is its own: none to build
        charset = attempt.job.charset or "utf-8"
        try:
            sender = self._envelope_sender(attempt)
            attempt.added = self._unsubscribe_headers(attempt)
            if attempt.job.raw_b64 is not None:
                mail = raw_mail(
                    attempt.job,
                    attempt.job_id,
                    attempt.now,
                    limit=self.settings.max_message_bytes,
                    added_headers=attempt.added,
                )
            else:
                content = await self.composer.compose(attempt.job)
                if content.template is not None:
                    name, version = content.template
                    attempt.details["template"] = {"name": name, "version": version}
                    attempt.ctx = dataclasses.replace(attempt.ctx, template=content.template)
                mail = self._build(attempt, content, charset)
        except DeadLetterError as exc:
            return await self._dead(attempt, exc.reason, str(exc))
        except AttachmentUnavailableError as exc:
            return await self._failed(attempt, classify(exc))
        except ConfigurationError as exc:  # no unsubscribe URL, or no key yet: retry later
            return await self._failed(attempt, Failure(True, None, str(exc)))
        if attempt.send_at is not None:
            # Claimed ahead, ready to go: the outbox and its token are taken at its time.
            await asyncio.sleep(max((attempt.send_at - self.clock()).total_seconds(), 0.0))
        if attempt.ctx.sandbox and self.settings.sandbox_outbox is None:
            return await self._accepted(attempt, NOT_DELIVERED, 0.0)  # built, never handed over
        try:
            choice = await self._choose(attempt)
        except DeadLetterError as exc:  # a sealed server no key opens: never retried
            return await self._dead(attempt, exc.reason, str(exc))
        except ConfigurationError as exc:  # an outbox an operator can fix: retry later
            return await self._failed(attempt, Failure(True, None, str(exc)))
        if choice is None:
            error = f"no outbox for domain {attempt.job.domain} and no MAILBUS_DEFAULT_SMTP_URL"
            return await self._dead(attempt, "no_outbox", error)
        pool = choice.pool
        outbox = pool.outbox
        attempt.ctx = dataclasses.replace(attempt.ctx, outbox=outbox.name, provider=outbox.provider)
        structlog.contextvars.bind_contextvars(outbox=outbox.name)
        if choice.throttle is not None:
            return await self._throttled(attempt, choice.throttle)
        wanted = outbox.charset if attempt.job.charset is None else None
        if content is not None and wanted not in (None, charset):
            # The one case for a second build: an outbox that asks for its own charset.
            try:
                mail = self._build(attempt, content, wanted)
            except DeadLetterError as exc:
                return await self._dead(attempt, exc.reason, str(exc))
        try:
            # Last, over the very bytes handed over: a retry is a new attempt, signed anew.
            mail = await self.signer.sign(mail, attempt.job.domain)
        except ConfigurationError as exc:  # a DKIM key an operator can fix: retry later
            return await self._failed(attempt, Failure(True, None, str(exc)))
        except ValueError as exc:  # a message with nothing to sign for (no From)
            return await self._dead(attempt, "invalid", str(exc))
        return await self._send(attempt, pool, mail, sender, recipients)

    async def _recipients(self, attempt: Attempt) -> list[str]:
        """Who gets the mail: those still owed it (after a partial delivery, only they),
        less the suppressed ones, which the job's record lists.
        """
        pending = attempt.claim.pending
        owed = list(pending) if pending is not None else attempt.job.recipients()
        asked = attempt.job.unsubscribe
        suppressed = await self.suppressions.among(
            owed, domain=attempt.job.domain, list_name=asked.list_ if asked else None
        )
        if suppressed:
            attempt.details["suppressed"] = sorted(suppressed)
        return [r for r in owed if r.lower() not in suppressed]

    def _unsubscribe_headers(self, attempt: Attempt) -> dict[str, str]:
        """The job's List-Unsubscribe headers, when it asks for them; raises
        :class:`ConfigurationError` when mailbus cannot make its link.
        """
        if attempt.job.unsubscribe is None:
            return {}
        base_url = self.settings.unsubscribe_url
        if base_url is None or self.vault is None:
            raise ConfigurationError(
                "the job asks for an unsubscribe link: set MAILBUS_UNSUBSCRIBE_URL and "
                "MAILBUS_SECRET_KEY (shared with the REST gateway that serves the link)"
            )
        expires = attempt.now + timedelta(days=self.settings.unsubscribe_days)
        return link_headers(
            attempt.job, attempt.job_id, base_url=base_url, vault=self.vault, expires=expires
        )

    def _build(self, attempt: Attempt, content: Content, charset: str) -> Mail:
        return build_mail(
            attempt.job,
            attempt.job_id,
            attempt.now,
            content,
            charset=charset,
            limit=self.settings.max_message_bytes,
            added=attempt.added,
        )

    async def _throttled(self, attempt: Attempt, throttle: Throttle) -> Outcome:
        """No token now: the job waits for its place in the provider's queue, its attempt
        given back.
        """
        reservation, due = throttle.reservation, throttle.until
        await self.store.mark_throttled(
            attempt.job_id, self.worker_id, reservation, due, attempt.body
        )
        waiting = dataclasses.replace(attempt.ctx, attempts=attempt.claim.attempts - 1)
        # Announced once, when the job queues; waking a hair early is no news.
        again = reservation == attempt.claim.reserved
        return Later(waiting, due, "waiting" if again else "rate_limited")

    async def _send(
        self, attempt: Attempt, pool: Sender, mail: Mail, sender: str, recipients: list[str]
    ) -> Outcome:
        started = time.perf_counter()
        try:
            result = await pool.send(mail, sender, recipients)
        except Exception as exc:  # every send failure is classified by mail.failures
            failure = classify(exc, await self._reply_rules(attempt))
            if attempt.claim.pending is not None and failure.refusals and failure.code:
                # Everyone left refused, after an earlier attempt delivered to the others:
                # the mail is out, so this is one more partial delivery, never a failure.
                left = SendResult(failure.code, failure.message, dict(failure.refusals))
                return await self._accepted(attempt, left, time.perf_counter() - started)
            return await self._failed(attempt, failure)
        seconds = time.perf_counter() - started
        log.debug("job.accepted", seconds=round(seconds, 4))
        return await self._accepted(attempt, result, seconds)

    def _envelope_sender(self, attempt: Attempt) -> str:
        """MAIL FROM: the job's return address at its domain's own bounce domain, else at
        MAILBUS_BOUNCE_DOMAIN when that is set (the header From is untouched); the job's
        own sender without either, for sandboxed mail and for a server the job names
        itself, whose bounces are its owner's to read. Raises :class:`ConfigurationError`
        for a domain's bounce domain without MAILBUS_SECRET_KEY to sign the address.
        """
        job, at = attempt.job, attempt.ctx.bounce_domain
        if attempt.ctx.sandbox or job.smtp_sealed is not None:
            return job.envelope_sender()
        if at is None and (self.returns is None or self.returns.domain is None):
            return job.envelope_sender()
        if self.returns is None:
            raise ConfigurationError(
                f"domain {job.domain}'s bounce domain {at} needs MAILBUS_SECRET_KEY on the "
                "workers: it signs each mail's return address"
            )
        return self.returns.address(attempt.job_id, at)

    async def _dead(self, attempt: Attempt, reason: DeadReason, error: str) -> Outcome:
        """The claimed job can never be sent: record it dead and say why."""
        ctx = attempt.ctx
        await self.store.mark_failed(
            attempt.job_id, self.worker_id, "dead", reason, error, attempt.details, ctx.outbox
        )
        return Dead(ctx, reason, error)

    async def _accepted(self, attempt: Attempt, result: SendResult, seconds: float) -> Outcome:
        """The server took the mail for some recipients at least: record it, and retry the
        ones it deferred (4xx) while attempts remain; they alone get the next attempt.
        """
        ctx = attempt.ctx
        rules = await self._reply_rules(attempt) if result.refused else ()
        final, deferred = split_refusals(result.refused, rules)
        refused = {**(attempt.claim.refused or {}), **_as_documents(final)}
        throttled = [r for r in deferred.values() if reply_verdict(*r, rules) == "throttle"]
        if deferred:
            rcpt, (code, text) = min(deferred.items())
            failure = Failure(True, code, f"<{rcpt}> {text}", throttle=bool(throttled))
            decision = self._decide(failure, attempt)
            if decision.retry_in is not None:
                due = self.clock() + timedelta(seconds=decision.retry_in)
                partial = (sorted(deferred), refused)
                # Some recipients have the mail: only this record keeps them from getting
                # it again, so it is written whatever it takes (never released instead).
                await _written(
                    "deferral",
                    lambda: self.store.mark_retry(
                        attempt.job_id,
                        self.worker_id,
                        failure.describe(),
                        due,
                        attempt.body,
                        ctx.outbox,
                        partial,
                        reply=smtp_reply(code, failure.message),
                    ),
                )
                await self._slow_provider(attempt, failure)
                # The next attempt sees only its own refusals: unknown ones are noted now.
                await self._suppress_unknown(attempt, final)
                return Later(ctx, due, "retry", failure)
            refused.update(_as_documents(deferred))
        await self._record_sent(attempt, result, refused)
        if throttled:
            await self._slow_provider(attempt, Failure(True, *throttled[0], throttle=True))
        await self._suppress_unknown(attempt, final)
        every_refusal = {r: (int(d["code"]), str(d["message"])) for r, d in refused.items()}
        accepted = SendResult(result.code, result.message, every_refusal)
        return Sent(ctx, accepted, tuple(attempt.details.get("suppressed", ())), seconds)

    async def _failed(self, attempt: Attempt, failure: Failure) -> Outcome:
        ctx = attempt.ctx
        decision = self._decide(failure, attempt)
        if decision.retry_in is None:
            reason = decision.reason or "permanent"
            await self.store.mark_failed(
                attempt.job_id,
                self.worker_id,
                "failed",
                reason,
                failure.describe(),
                outbox=ctx.outbox,
                reply=smtp_reply(failure.code, failure.message),
            )
            await self._slow_provider(attempt, failure)
            await self._suppress_unknown(attempt, failure.refusals)
            return Dead(ctx, reason, failure.describe(), failure.code)
        due = self.clock() + timedelta(seconds=decision.retry_in)
        await self.store.mark_retry(
            attempt.job_id,
            self.worker_id,
            failure.describe(),
            due,
            attempt.body,
            ctx.outbox,
            reply=smtp_reply(failure.code, failure.message),
        )
        await self._slow_provider(attempt, failure)
        # Every recipient was refused, some only for now: the unknown ones are not retried.
        await self._suppress_unknown(attempt, failure.refusals)
        return Later(ctx, due, "retry", failure)

    async def _choose(self, attempt: Attempt) -> Choice | None:
        """The catch-all outbox for a sandboxed job, else the server the job brings
        sealed, else the outbox it queued for, else whose turn it is: after a transient
        failure, another outbox of the domain if there is one.
        """
        job = attempt.job
        if attempt.ctx.sandbox and (catch_all := self.settings.sandbox_outbox) is not None:
            return await self.picker.sandbox(catch_all)
        if job.smtp_sealed is not None:
            return await self.picker.sealed(job.smtp_sealed, job.domain, attempt.job_id)
        claim = attempt.claim
        if claim.reserved is not None:
            choice = await self.picker.reserved(claim.reserved)
            if choice is not None:
                return choice
        return await self.picker.choose(attempt.job.domain, avoid=claim.last_outbox)

    async def _reply_rules(self, attempt: Attempt) -> tuple[ReplyRule, ...]:
        """The rules for the replies of the attempt's provider, read once an attempt. None
        are read when MongoDB does not answer (or holds a rule no command wrote): the
        codes alone decide then, as the mail may be out and its record must not wait.
        """
        provider = attempt.ctx.provider
        if attempt.rules is None and provider is not None:
            try:
                attempt.rules = await self.picker.reply_rules(provider)
            except (StoreUnavailableError, ConfigurationError) as exc:
                log.warning("job.reply_rules_unread", provider=provider, error=str(exc))
        return attempt.rules or ()

    async def _slow_provider(self, attempt: Attempt, failure: Failure) -> None:
        """After a throttling reply, slow the provider for ``MAILBUS_THROTTLE_SECONDS``: its
        jobs, this one's retry among them, then go at half its rate. Done once the job's
        own record is written: a slowdown MongoDB did not take loses no mail.
        """
        provider, seconds = attempt.ctx.provider, self.settings.throttle_seconds
        if not failure.throttle or provider is None or seconds <= 0:
            return
        try:
            until = await self.picker.slow(provider, seconds)
        except StoreUnavailableError as exc:
            log.warning("provider.slowdown_not_recorded", provider=provider, error=str(exc))
            return
        if until is not None:
            log.info(
                "provider.slowed",
                provider=provider,
                until=until.isoformat(),
                reply=failure.describe(),
            )

    def _decide(self, failure: Failure, attempt: Attempt) -> Decision:
        settings = self.settings
        return decide(
            failure,
            attempt.ctx.attempts,
            self.store.attempt_limit(attempt.job),
            settings.retry_base_delay,
            settings.retry_max_delay,
            self.jitter(),
        )

    async def _suppress_unknown(
        self, attempt: Attempt, refused: Mapping[str, tuple[int, str]]
    ) -> None:
        """Put recipients a server called unknown on the job's domain's suppression list,
        for a while.

        Runs after the job's own record is written; failing here loses no mail. A
        sandboxed job's catch-all knows nothing of the real addresses: it suppresses none.
        """
        unknown = unknown_recipients(refused, attempt.rules or ())
        days = self.settings.bounce_suppression_days
        if not unknown or days <= 0 or attempt.ctx.sandbox:
            return
        try:
            await self.suppressions.add_automatic(
                unknown, scope=Scope(attempt.job.domain), source="bounce", days=days
            )
        except StoreUnavailableError as exc:
            log.warning("job.suppression_not_recorded", error=str(exc), recipients=sorted(unknown))
            return
        log.info("job.recipients_suppressed", recipients=sorted(unknown), days=days)

    async def _record_sent(
        self, attempt: Attempt, result: SendResult, refused: dict[str, Any]
    ) -> None:
        """Write ``sent`` whatever it takes: the mail is out, so it must never go out again."""
        reply = {"code": result.code, "message": result.message}
        recorded = await _written(
            "sent",
            lambda: self.store.mark_sent(
                attempt.job_id,
                self.worker_id,
                reply,
                refused,
                attempt.ctx.outbox,
                attempt.details,
            ),
        )
        if not recorded:
            log.warning("job.lease_lost_before_sent_record")


async def _written(what: str, write: Callable[[], Awaitable[Written]]) -> Written:
    """The answer of ``write``, a record of mail that is out, tried again (backing off up
    to 10 s) for as long as MongoDB does not answer.
    """
    pause = 0.5
    while True:
        try:
            return await write()
        except StoreUnavailableError as exc:
            log.warning(f"job.{what}_record_retrying", error=str(exc), pause=pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 10.0)


def _as_documents(refused: Mapping[str, tuple[int, str]]) -> dict[str, Any]:
    """Refusals as stored on the job: ``{address: {code, message}}``."""
    return {rcpt: {"code": code, "message": text} for rcpt, (code, text) in refused.items()}


def _store_failed(
    ctx: Context, exc: StoreUnavailableError, now: datetime, release: Release | None = None
) -> Later:
    """MongoDB did not answer: the job comes round again shortly."""
    log.warning("job.store_unavailable", error=str(exc))
    return Later(ctx, now + STORE_RETRY, "store", release=release)


def _not_claimed(ctx: Context, claim: Claim) -> Outcome:
    """What to do with a job whose record says someone else, or some other time."""
    match claim.state:
        case ClaimState.LEASED if claim.lease_until is not None:
            return Later(ctx, claim.lease_until, "leased")
        case ClaimState.WAITING if claim.due_at is not None:
            return Later(ctx, claim.due_at, "waiting")
        case ClaimState.EXHAUSTED:
            spent = dataclasses.replace(ctx, attempts=claim.attempts)
            return Dead(spent, "delivery_limit", exhausted_error(claim.attempts))
        case ClaimState.CONFLICT:
            # Which domain holds the id is that domain's business.
            return Dead(ctx, "conflict", f"job id {ctx.job_id} is taken by another domain's job")
        case ClaimState.DONE if (status := final_status(claim.status)) is not None:
            return Skip(ctx, status)
        case _:  # a record no claim leaves behind: loud, and bounded by the delivery limit
            error = f"unexpected job record: {claim.state.value}, {claim.status}"
            log.error("job.crashed", error=error)
            return Crashed(ctx, error)
