"""The consume loop: one task per delivery, one place that settles it, a drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine, Mapping
from datetime import timedelta
from typing import Any, assert_never

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aiormq.exceptions import AMQPError, ChannelInvalidStateError

from consumer.amqp import topology
from consumer.amqp.acks import Acks
from consumer.amqp.outgoing import Outgoing, copy_of
from consumer.amqp.publish import job_message
from consumer.clock import REMEASURE_SECONDS, StoreClock, utcnow
from consumer.core import ladder
from consumer.core.control import Request, Result, parse_request
from consumer.core.events import Event, event_for, reply_for
from consumer.core.names import DUE_KEY, Names
from consumer.core.outcomes import Context, Crashed, Dead, Later, Outcome, Sent, Skip
from consumer.core.refusals import InvalidJobError
from consumer.core.schedule import CLAIM_AHEAD, carried_headers, claims_ahead
from consumer.core.vocabulary import FeedbackTally
from consumer.errors import StoreUnavailableError, connection_failure
from consumer.logging import get_logger
from consumer.mail.fetch import Fetcher
from consumer.service import control
from consumer.service.alerts import Digests, alert_document, check_addresses, is_digest
from consumer.service.authorization import (
    Authority,
    Authorizer,
    Intake,
    broker_login,
    intake,
    seal,
    without_domain_key,
)
from consumer.service.health import Readiness, consuming_live, on_loop, serving
from consumer.service.metrics import Metrics
from consumer.service.picker import OutboxPicker
from consumer.service.pipeline import STORE_RETRY, Pipeline
from consumer.settings import Settings, redact_url
from consumer.store.mongo import Mongo
from consumer.vault import Vault

log = get_logger(__name__)
RECONNECT_INTERVAL = 2.0
# A job held to its due time is processed again in the same task; bounded, in case its
# record keeps answering "a moment later".
MAX_HOLDS = 3
# A held job's lease is renewed this many times in a lease: a renewal may be late, or
# fail while MongoDB blips, a few times before the lease could run out.
RENEWALS_PER_LEASE = 4
_BROKER_ERRORS = (AMQPError, ChannelInvalidStateError, ConnectionError)
Settled = Outcome | Result


class Worker:
    """Consumes the send and control queues and carries each outcome out on the broker."""

    def __init__(
        self,
        *,
        settings: Settings,
        worker_id: str,
        clock: StoreClock,
        mongo: Mongo,
        vault: Vault | None,
        picker: OutboxPicker,
        authorizer: Authorizer,
        fetcher: Fetcher,
        pipeline: Pipeline,
    ) -> None:
        """The parts are wired by :func:`consumer.service.wiring.build_worker`; ``clock``
        is MongoDB's as this worker measures it, which ``mongo`` and ``pipeline`` read.
        """
        self.settings = settings
        self.names = Names(settings.prefix)
        self.worker_id = worker_id
        self.clock = clock
        self.mongo = mongo
        self.store = mongo.jobs
        self.vault = vault
        self.picker = picker
        self.authorizer = authorizer
        self.fetcher = fetcher
        self.pipeline = pipeline
        self._tasks: set[asyncio.Task[None]] = set()
        self._draining = asyncio.Event()
        self._outgoing: Outgoing | None = None
        self._acks = Acks()
        self._connection: AbstractRobustConnection | None = None
        self._consuming = False
        self.metrics = Metrics(
            lambda: len(self._tasks), self.picker.connections, self.store.commands.counts
        )
        self.http_port: int | None = None  # once serving (MAILBUS_HTTP_PORT)
        self._broker_user = broker_login(settings.amqp_url.get_secret_value())
        self.digests: Digests | None = None
        if settings.admin_email:
            admin = settings.admin_email
            sender = settings.admin_from or f"mailbus@{admin.rpartition('@')[2]}"
            check_addresses(admin, sender)
            interval = settings.admin_digest_seconds
            self.digests = Digests(
                self.mongo.alerts,
                admin,
                sender,
                interval,
                self._publish_digest,
                self.mongo.feedback,
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then drain and close everything; serve the HTTP
        endpoints meanwhile when ``MAILBUS_HTTP_PORT`` is set.
        """
        port = self.settings.http_port
        if port is None:
            await self._run(stop)
            return
        loop = asyncio.get_running_loop()
        readiness = Readiness(loop, self._ready, self.store.ping)
        self.metrics.watch_providers(lambda: on_loop(loop, self.mongo.providers.find))
        self.metrics.watch_feedback(lambda: on_loop(loop, self._last_day_feedback))
        with serving(
            self.settings.http_host,
            port,
            self.metrics.registry,
            readiness,
            max_connections=self.settings.http_max_connections,
            read_timeout=self.settings.http_read_timeout,
        ) as server:
            self.http_port = server.server_port
            await self._run(stop)

    def _ready(self) -> bool:
        """Consuming, on a connection that is up (read from the HTTP thread)."""
        return consuming_live(self._consuming, self._connection)

    async def _last_day_feedback(self) -> Mapping[FeedbackTally, int]:
        """Bounces and complaints that came back in the last 24 hours."""
        now = utcnow()
        return await self.mongo.feedback.since(now - timedelta(days=1), now)

    async def _run(self, stop: asyncio.Event) -> None:
        connection = await self._connect(stop)
        if connection is None:
            return
        self._connection = connection
        try:
            channel = await connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=self.settings.prefetch)
            objects = await topology.declare(channel, self.names, self.settings.delivery_limit)
            self._outgoing = await Outgoing.open(
                channel,
                self.names,
                dead_letter_days=self.settings.dead_letter_days,
                reply_prefix=self.settings.reply_queue_prefix,
                vault=self.vault,
            )
            if not await self._wait_for_store(stop):
                return
            await self._measure_clock(announce=True)
            timing = asyncio.create_task(self._keep_time(stop))
            # Renewed until the drain is over: jobs still being sent keep their leases.
            drained = asyncio.Event()
            renewing = asyncio.create_task(self._keep_leases(drained))
            consumers = []
            for queue in objects.consume:
                tag = await queue.consume(self._on_message)
                consumers.append((queue, tag))
            tag = await objects.control.consume(self._on_control)
            consumers.append((objects.control, tag))
            log.info(
                "worker.consuming",
                worker=self.worker_id,
                queues=[q.name for q, _ in consumers],
                prefetch=self.settings.prefetch,
            )
            self._consuming = True
            looking = None
            if self.digests is not None:
                looking = asyncio.create_task(self._look_for_digests(self.digests, stop))
            await stop.wait()
            self._consuming = False
            await timing
            if looking is not None:
                await looking
            log.info("worker.draining", in_flight=len(self._tasks))
            for queue, tag in consumers:
                try:
                    await queue.cancel(tag)
                except _BROKER_ERRORS as exc:
                    log.warning("worker.cancel_failed", error=str(exc))
            await self._drain()
            drained.set()
            await renewing
        finally:
            await self.picker.close()
            await self.fetcher.close()
            await connection.close()
            await self.mongo.close()
            log.info("worker.stopped", worker=self.worker_id)

    async def _connect(self, stop: asyncio.Event) -> AbstractRobustConnection | None:
        url = self.settings.amqp_url.get_secret_value()
        while not stop.is_set():
            try:
                return await aio_pika.connect_robust(
                    url,
                    reconnect_interval=RECONNECT_INTERVAL,
                    client_properties={"connection_name": f"mailbus worker {self.worker_id}"},
                )
            except (AMQPError, OSError) as exc:
                log.warning(
                    "worker.broker_unreachable",
                    url=redact_url(url),
                    error=connection_failure(exc),
                )
                await _wait(stop, RECONNECT_INTERVAL)
        return None

    async def _wait_for_store(self, stop: asyncio.Event) -> bool:
        while not stop.is_set():
            try:
                await self.mongo.ensure_indexes(alerts=self.digests is not None)
            except StoreUnavailableError as exc:
                log.warning("worker.store_unreachable", error=str(exc))
                await _wait(stop, RECONNECT_INTERVAL)
            else:
                await self._warn_if_unsealed()
                return True
        return False

    async def _warn_if_unsealed(self) -> None:
        """Without MAILBUS_SECRET_KEY this worker's events go unsealed, and webhooks
        deliver none of them (they would sign whatever a publisher wrote): said at start,
        when any endpoint is registered, so that nobody waits for deliveries in vain.
        """
        if self.vault is not None:
            return
        try:
            endpoints = await self.mongo.webhooks.active()
        except StoreUnavailableError:
            return
        if endpoints:
            log.warning(
                "worker.events_unsealed",
                endpoints=len(endpoints),
                note="no MAILBUS_SECRET_KEY: webhooks deliver none of this worker's events",
            )

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.metrics.received.inc()
        self._acks.received(message)
        self._spawn(settled_once(message, self._handle(message), self._acks))

    async def _on_control(self, message: AbstractIncomingMessage) -> None:
        self._acks.received(message)
        self._spawn(settled_once(message, self._handle_control(message), self._acks))

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        """Process a job; one due within the ladder's resolution is held and processed again."""
        structlog.contextvars.clear_contextvars()
        started = time.perf_counter()
        taken = self._intake(message)
        authority, headers = taken.authority, taken.headers
        events: list[Event] = []
        outcome: Outcome
        try:
            outcome = await self._process(message, headers, authority)
            holds = 0
            while isinstance(outcome, Later) and holds < MAX_HOLDS and await self._hold(outcome):
                holds += 1
                # A held attempt (a quick retry through another outbox, say) is an outcome
                # of its own: logged and counted like one that went through the ladder.
                self._record(outcome, headers, message, started)
                events.extend(_events_of(outcome))
                headers = carried_headers(headers, outcome.due_at)
                ahead = claims_ahead(outcome.why)
                outcome = await self._process(message, headers, authority, claim_ahead=ahead)
        except Exception as exc:  # whatever a delivery raises, it is settled, never left held
            log.exception("job.crashed")
            outcome = Crashed(Context(message.message_id), f"{type(exc).__name__}: {exc}")
        events.extend(_events_of(outcome))
        await self._settle(message, outcome, headers, events, started, authority)

    def _intake(self, message: AbstractIncomingMessage) -> Intake:
        """The delivery's authority and the headers kept of it (see :func:`intake`)."""
        return intake(
            message.headers or {},
            user_id=message.user_id,
            message_id=message.message_id,
            body=message.body,
            vault=self.vault,
            now=self.clock.now(),
        )

    async def _process(
        self,
        message: AbstractIncomingMessage,
        headers: Mapping[str, Any],
        authority: Authority,
        *,
        claim_ahead: bool = False,
    ) -> Outcome:
        return await self.pipeline.process(
            message.body, message.message_id, headers, authority, claim_ahead=claim_ahead
        )

    async def _hold(self, outcome: Later) -> bool:
        """Keep a job due within the ladder's resolution until its time, without blocking
        other deliveries. False when it is not held (a longer wait, or draining).
        """
        remaining = (outcome.due_at - self.clock.now()).total_seconds()
        if self._draining.is_set() or not ladder.route(remaining).hold:
            return False
        # Woken to be claimed ahead of its time, where it may be (see CLAIM_AHEAD).
        early = CLAIM_AHEAD.total_seconds() if claims_ahead(outcome.why) else 0.0
        await _wait(self._draining, remaining - early)
        return not self._draining.is_set()

    async def _handle_control(self, message: AbstractIncomingMessage) -> None:
        structlog.contextvars.clear_contextvars()
        started = time.perf_counter()
        result: Settled
        # A control request's authority is its key or broker user, never a header; what
        # the producer set under x-mailbus-* is dropped from its answer and dead letter.
        headers = self._intake(message).headers
        authority = Authority(message.user_id)
        try:
            request = parse_request(message.body, max_bytes=self.settings.max_job_bytes)
        except InvalidJobError as exc:
            result = Dead(Context(message.message_id), exc.reason, str(exc))
        else:
            try:
                result = await self._execute(request, message)
            except Exception as exc:  # settled like a job that crashed, never left held
                log.exception("control.crashed")
                result = Crashed(Context(message.message_id), f"{type(exc).__name__}: {exc}")
        await self._settle(message, result, headers, [], started, authority)

    async def _execute(
        self, request: Request, message: AbstractIncomingMessage
    ) -> Result | Crashed:
        while True:
            try:
                refused = await control.refusal(
                    request, self.store, self.authorizer, message.user_id
                )
                if refused is not None:
                    return refused
                return await control.execute(
                    request,
                    self.store,
                    self._out(),
                    self.clock.now(),
                    vault=self.vault,
                    seal_days=self.settings.seal_days,
                )
            except StoreUnavailableError as exc:
                if self._draining.is_set():
                    return Crashed(Context(message.message_id), str(exc))
                log.warning("control.store_unavailable", error=str(exc))
                await _wait(self._draining, STORE_RETRY.total_seconds())

    async def _settle(
        self,
        message: AbstractIncomingMessage,
        outcome: Settled,
        headers: Mapping[str, Any],
        events: list[Event],
        started: float,
        authority: Authority,
    ) -> None:
        """The one place a delivery is acked or nacked for its outcome, after everything it
        caused is durable (:func:`settled_once` only returns one whose handling raised).

        A job that must wait goes back by way of the ladder to the due queue, with
        ``headers`` (its due time made absolute) and its ``authority`` sealed on;
        ``events`` are published before the ack. The outcome's log line says how long the
        delivery took since ``started`` (``time.perf_counter``).
        """
        out = self._out()
        try:
            if isinstance(outcome, Crashed):
                if _deliveries(message) < self.settings.delivery_limit:
                    await self._acks.nack(message, requeue=True)
                    return
                # Returned once more, the broker would dead-letter the delivery as it came,
                # domain key and all: the worker does it, the way it does every dead letter.
                outcome = Dead(outcome.ctx, "delivery_limit", outcome.error)
            if isinstance(outcome, Result):
                publishes = [out.reply(message, outcome.as_dict())]
                if outcome.unauthorized:
                    publishes.append(
                        out.dead_letter(
                            message,
                            without_domain_key(message.body),
                            headers,
                            "unauthorized",
                            outcome.detail,
                            0,
                            None,
                        )
                    )
                await asyncio.gather(*publishes)
                await self._acks.ack(message)
                log.info("control.done", **outcome.as_dict())
                return
            # Independent publishes wait for their confirms together, then the ack.
            publishes = [out.event(*event) for event in events]
            if isinstance(outcome, Dead):
                ctx = outcome.ctx
                if self.digests is not None and not is_digest(ctx.job_id):
                    publishes.append(self._note_alert(outcome))
                body, letter_headers = self._copy_parts(message, headers, outcome, authority)
                publishes.append(
                    out.dead_letter(
                        message,
                        body,
                        letter_headers,
                        outcome.reason,
                        outcome.error,
                        ctx.attempts,
                        outcome.code,
                        ctx.job_id,
                    )
                )
            elif isinstance(outcome, Later):
                carried = carried_headers(headers, outcome.due_at)
                body, carried = self._copy_parts(message, carried, outcome, authority)
                copy = copy_of(message, carried, body, outcome.ctx.job_id)
                publishes.append(out.delay(copy, outcome.due_at, DUE_KEY, self.clock.now()))
            reply = reply_for(outcome)
            if reply is not None:
                publishes.append(out.reply(message, reply))
            await asyncio.gather(*publishes)
            await self._acks.ack(message)
        except _BROKER_ERRORS as exc:
            # Unacked, the delivery comes back; the job's record keeps it from going out twice.
            log.warning("job.settle_failed", error=f"{type(exc).__name__}: {exc}")
            return
        self._record(outcome, headers, message, started)

    def _copy_parts(
        self,
        message: AbstractIncomingMessage,
        headers: Mapping[str, Any],
        outcome: Later | Dead,
        authority: Authority,
    ) -> tuple[bytes, dict[str, Any]]:
        """The body and headers of the job's next copy (ladder or dead letter): once the
        job is authorized, its key is out of the body and its domain sealed on, with the
        broker user and, going back to the ladder, a lease let go of. A dead letter never
        keeps the key; without ``MAILBUS_SECRET_KEY`` a waiting copy keeps it, as nothing
        could vouch for it instead.
        """
        ctx = outcome.ctx
        body = message.body
        if isinstance(outcome, Dead) or (ctx.authorized and self.vault is not None):
            # A body over the job limit was never decoded, and is not decoded now either.
            body = without_domain_key(body, parse=len(body) <= self.settings.max_job_bytes)
        later = outcome if isinstance(outcome, Later) else None
        sealed = Authority(
            authority.user,
            ctx.job.domain if ctx.authorized and ctx.job is not None else None,
            later.release if later is not None else None,
        )
        after = later.due_at if later is not None else self.clock.now()
        carried = seal(
            headers,
            sealed,
            message_id=ctx.job_id or message.message_id,
            body=body,
            vault=self.vault,
            expires=after + timedelta(days=self.settings.seal_days),
        )
        return body, carried

    def _record(
        self,
        outcome: Outcome,
        headers: Mapping[str, Any],
        message: AbstractIncomingMessage,
        started: float,
    ) -> None:
        """A job outcome's log line and metrics."""
        _log_outcome(outcome, time.perf_counter() - started)
        self.metrics.observe(outcome, headers, message.timestamp, self.clock.now())

    async def _note_alert(self, dead: Dead) -> None:
        """Note a dead letter for the admin digest; best effort, as the letter itself is
        safe in the dead-letter queue.
        """
        ctx = dead.ctx
        domain = ctx.job.domain if ctx.job is not None else None
        keep = timedelta(days=self.settings.retention_days)
        alert = alert_document(ctx.job_id, dead.reason, dead.error, domain, utcnow(), keep)
        try:
            await self.mongo.alerts.note(alert)
        except StoreUnavailableError as exc:
            log.warning("alerts.not_noted", error=str(exc))

    async def _publish_digest(self, job: dict[str, Any]) -> None:
        message = job_message(job)
        # As its own RabbitMQ user, which a registered domain may allow (--allow-user).
        message.user_id = self._broker_user
        await self._out().job(message)

    async def _measure_clock(self, announce: bool = False) -> None:
        """Measure the offset to MongoDB's clock; the last one stays if it cannot be read."""
        try:
            offset = await self.clock.measure(self.store.server_time)
        except StoreUnavailableError as exc:
            log.warning("worker.clock_not_measured", error=str(exc))
            return
        say = log.info if announce else log.debug
        say("worker.clock", offset_ms=round(offset.total_seconds() * 1000, 1))

    async def _keep_time(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await _wait(stop, REMEASURE_SECONDS)
            if not stop.is_set():
                await self._measure_clock()

    async def _keep_leases(self, drained: asyncio.Event) -> None:
        """Renew the leases of the jobs being sent, in one update, until ``drained``: a
        live worker's job is never taken over, while a dead one's is within a lease.
        """
        pause = self.settings.lease_seconds / RENEWALS_PER_LEASE
        while not drained.is_set():
            await _wait(drained, pause)
            held = self.pipeline.leases_held()
            if drained.is_set() or not held:
                continue
            try:
                await self.store.renew(held, self.worker_id)
            except StoreUnavailableError as exc:
                log.warning("worker.leases_not_renewed", error=str(exc), jobs=len(held))
            except Exception:
                # A side task: whatever it hits must not stop the renewals to come.
                log.exception("worker.leases_renewal_crashed")

    async def _look_for_digests(self, digests: Digests, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                pause = await digests.tick(utcnow())
            except (StoreUnavailableError, *_BROKER_ERRORS) as exc:
                log.warning("alerts.digest_failed", error=f"{type(exc).__name__}: {exc}")
                pause = RECONNECT_INTERVAL
            except Exception:
                # A side task: whatever it hits must not take the worker's drain down with it.
                log.exception("alerts.digest_crashed")
                pause = RECONNECT_INTERVAL
            await _wait(stop, pause)

    def _out(self) -> Outgoing:
        assert self._outgoing is not None  # consuming implies the exchanges are bound
        return self._outgoing

    async def _drain(self) -> None:
        """Let in-flight jobs finish (holds end at once), bounded by the drain timeout."""
        self._draining.set()
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=self.settings.drain_timeout)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("worker.drain_timeout", cancelled=len(pending))
            await asyncio.gather(*pending, return_exceptions=True)


async def settled_once(
    message: AbstractIncomingMessage, handling: Coroutine[Any, Any, None], acks: Acks
) -> None:
    """Run ``handling``, which settles ``message`` through :meth:`Worker._settle` and
    ``acks``. If it raises before the delivery is settled, the delivery is returned to its
    queue here (the broker's delivery limit bounds the returns), never held until the
    channel closes.
    A delivery is settled once: what was acked or nacked is left alone, and one that
    ``_settle`` chose to leave unsettled (its copies could not be published) waits for
    the channel, as it says.
    """
    try:
        await handling
    except Exception:
        log.exception("delivery.crashed")
        if not acks.settled(message):
            with contextlib.suppress(*_BROKER_ERRORS):
                await acks.nack(message, requeue=True)


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds`` or until ``event`` is set, whichever comes first."""
    if seconds <= 0 or event.is_set():
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


def _deliveries(message: AbstractIncomingMessage) -> int:
    """How many times the broker has delivered ``message``, this time included (a quorum
    queue counts the returns in ``x-delivery-count``).
    """
    count = (message.headers or {}).get("x-delivery-count", 0)
    return (count if isinstance(count, int) else 0) + 1


def _events_of(outcome: Outcome) -> list[Event]:
    event = event_for(outcome)
    return [event] if event is not None else []


def _log_outcome(outcome: Outcome, seconds: float) -> None:
    """One line per settled delivery; job id, domain, attempt and outbox are bound already."""
    took = round(seconds * 1000, 1)
    match outcome:
        case Sent(result=result):
            log.info(
                "job.sent",
                result="sent",
                smtp_code=result.code,
                refused=len(result.refused),
                duration_ms=took,
            )
        case Dead(reason=reason, error=error, code=code):
            log.warning(
                "job.dead",
                result="dead",
                reason=reason,
                error=error,
                smtp_code=code,
                duration_ms=took,
            )
        case Later(why=why, due_at=due_at, failure=failure):
            log.info(
                "job.later",
                result="later",
                why=why,
                due_at=due_at.isoformat(),
                error=failure.describe() if failure else None,
                smtp_code=failure.code if failure else None,
                duration_ms=took,
            )
        case Skip(why=why):
            log.info("job.skipped", result="skipped", why=why, duration_ms=took)
        case Crashed():
            pass  # logged where it arose
        case _:
            assert_never(outcome)
