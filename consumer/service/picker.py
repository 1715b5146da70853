"""Choosing the outbox a job leaves through, and lending its connection pool.

Among the domain's active outboxes, the least used one whose provider has a token now
sends (round robin under the providers' limits). When no provider has a token, the job
queues at the provider whose token comes first and waits for its wake-up slot in the
delay ladder; it then takes that provider's token, ahead of jobs that have not queued,
and sends through the outbox it queued for. A token or wake-up slot due within
:data:`CLOSE_WAIT` is waited for in place instead, and the jobs of one process asking a
provider at the same time share one command (a block of tokens).
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog

from consumer.clock import utcnow
from consumer.core.outboxes import Outbox
from consumer.core.ratelimit import MICROS, Grant, Mode, Reservation
from consumer.core.replies import ReplyRule
from consumer.core.smtp_request import REQUESTED_LABEL
from consumer.errors import ConfigurationError
from consumer.mail.sendmail import SendmailPipe
from consumer.mail.transport import Sender, SMTPPool
from consumer.service.requested import RequestedServers
from consumer.store.batches import Batcher
from consumer.store.documents import Document
from consumer.store.outboxes import OutboxStore, outbox_from_document
from consumer.store.providers import ProviderStore
from consumer.vault import Vault

# Seconds a job waits for its token in place, holding its claim, rather than going round
# the delay ladder: tokens due this soon are taken ahead, in blocks.
CLOSE_WAIT = 2.0
_CLOSE_WAIT_US = round(CLOSE_WAIT * MICROS)


@dataclass(frozen=True)
class Throttle:
    """A token reserved for later: its slot is ``until`` on this machine's clock."""

    reservation: Reservation
    until: datetime


@dataclass(frozen=True)
class Choice:
    """The outbox for a job: send through ``pool`` now, or once ``throttle`` says."""

    pool: Sender
    throttle: Throttle | None = None


class OutboxPicker:
    """Chooses outboxes for jobs and keeps one connection pool per outbox."""

    def __init__(
        self,
        *,
        outboxes: OutboxStore,
        providers: ProviderStore,
        vault: Vault | None,
        default: Outbox | None,
        pool_size: int,
        idle_seconds: float,
        requested: RequestedServers,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        """``requested``: the servers jobs bring sealed; ``clock``: the time a throttled
        job's wait is counted from (the store's, in a worker: see :mod:`consumer.clock`).
        """
        self.clock = clock
        self.outboxes = outboxes
        self.providers = providers
        self.vault = vault
        self.default = default
        self.pool_size = pool_size
        self.idle_seconds = idle_seconds
        self.requested = requested
        self._pools: dict[str, Sender] = {}
        self._turns: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._takes: dict[tuple[str, Mode], Batcher[None, Grant | None]] = {}

    def connections(self) -> dict[str, int]:
        """Open connections per outbox, for metrics (read from the HTTP thread: the pools
        are copied in one step, as the event loop may add one meanwhile).
        """
        counts = {name: pool.connections for name, pool in list(self._pools.items())}
        if self.requested.connections:
            counts[REQUESTED_LABEL] = self.requested.connections
        return counts

    async def sealed(self, token: str, domain: str, job_id: str) -> Choice:
        """The server the job ``job_id`` of ``domain`` brings sealed in ``token``, in place
        of the domain's outboxes: no provider's limit holds it. Raises
        :class:`~consumer.core.refusals.InvalidJobError` when no configured key opens the
        token or it was sealed for another job.
        """
        return Choice(await self.requested.pool(token, domain, job_id))

    async def sandbox(self, name: str) -> Choice:
        """The catch-all outbox ``name`` (``MAILBUS_SANDBOX_OUTBOX``) a sandboxed job goes
        to, whatever domain either belongs to; no provider's token is taken, so sandboxed
        mail spends no limit. Raises :class:`~consumer.errors.ConfigurationError` when
        there is no such outbox or it is disabled.
        """
        doc = await self.outboxes.get(name)
        if doc is None or not doc.get("active", True):
            raise ConfigurationError(
                f"MAILBUS_SANDBOX_OUTBOX names {name!r}, which is not an active outbox "
                "(mailbus outbox ls)"
            )
        return Choice(await self._pool(outbox_from_document(doc, self.vault)))

    async def choose(self, domain: str, avoid: str | None = None) -> Choice | None:
        """The outbox whose turn it is among those whose provider allows a send now
        (``avoid`` only when no other can), else a place in the queue of the provider
        whose token comes first.

        The default outbox (no limits) when the domain has none; None without a default.
        """
        candidates = await self.outboxes.active(domain)
        if not candidates:
            return Choice(await self._pool(self.default)) if self.default is not None else None
        ordered = [c for c in candidates if c["_id"] != avoid] + [
            c for c in candidates if c["_id"] == avoid
        ]
        sharing = Counter(c.get("provider") for c in ordered)
        if len(sharing) == 1:
            return await self._one_provider(ordered[0], avoid, len(ordered))
        refused: dict[str, tuple[Grant, Document]] = {}
        for doc in ordered:
            provider: str | None = doc.get("provider")
            if provider is None:  # no provider, no limit
                return Choice(await self._counted(doc, avoid, sharing[provider]))
            if provider in refused:
                continue
            grant = await self._token(provider, "try")
            if grant is None or grant.granted:
                return Choice(await self._counted(doc, avoid, sharing[provider]))
            refused[provider] = (grant, doc)
        # Nobody may send now: queue for the provider whose token comes first.
        provider = min(refused, key=lambda name: refused[name][0].slot_us)
        doc = refused[provider][1]
        refusal = await self._wait_for_token(provider, await self._token(provider, "enqueue"))
        answered = self.clock()
        pool = await self._counted(doc, avoid, sharing[provider])
        if refusal is None:
            return Choice(pool)
        return Choice(pool, _throttle(pool.outbox.name, provider, refusal, answered))

    async def _one_provider(self, doc: Document, avoid: str | None, outboxes: int) -> Choice:
        """Every candidate shares one provider (or none): the turn is counted first, so
        the token is taken as close to the send as can be, and a refusal queues at once.
        """
        pool = await self._counted(doc, avoid, outboxes)
        provider: str | None = doc.get("provider")
        if provider is None:  # no provider, no limit
            return Choice(pool)
        refusal = await self._wait_for_token(provider, await self._token(provider, "enqueue"))
        if refusal is None:
            return Choice(pool)
        return Choice(pool, _throttle(pool.outbox.name, provider, refusal, self.clock()))

    async def reserved(self, reservation: Reservation) -> Choice | None:
        """The outbox a queued job waited for, once its provider gives it a token (a
        throttle again until the next token if not yet); None if that outbox was disabled
        or removed since: the job then chooses afresh.
        """
        doc = await self.outboxes.get(reservation.outbox)
        if doc is None or not doc.get("active", True):
            return None
        pool = await self._pool(outbox_from_document(doc, self.vault))
        provider = reservation.provider
        refusal = await self._wait_for_token(provider, await self._token(provider, "queued"))
        if refusal is None:
            return Choice(pool)
        return Choice(pool, Throttle(reservation, self.clock() + timedelta(seconds=refusal.wait)))

    async def reply_rules(self, provider: str) -> tuple[ReplyRule, ...]:
        """``provider``'s rules for SMTP replies, read when a reply needs judging."""
        return await self.providers.reply_rules(provider)

    async def slow(self, provider: str, seconds: float) -> datetime | None:
        """Slow ``provider``'s buckets for ``seconds`` (it is throttling); when that ends,
        or None when it is not defined.
        """
        return await self.providers.slow(provider, seconds)

    async def _token(self, provider: str, mode: Mode) -> Grant | None:
        """``provider``'s answer for one job, taken in one command with the other jobs of
        this process asking meanwhile; None when ``provider`` is not defined.
        """
        batcher = self._takes.get((provider, mode))
        if batcher is None:
            batcher = Batcher(functools.partial(self._take, provider, mode))
            self._takes[provider, mode] = batcher
        grant = await batcher.submit(None)
        if grant is not None and grant.granted:
            # Whichever way the token came, the job's log lines say which one it sent on,
            # on the server's clock.
            slot = datetime.fromtimestamp(grant.slot_us / MICROS, UTC)
            structlog.contextvars.bind_contextvars(rate_slot=slot.isoformat())
        return grant

    async def _take(self, provider: str, mode: Mode, jobs: Sequence[None]) -> list[Grant | None]:
        # A job only trying its luck wants a token now; the others take one due soon.
        horizon = 0 if mode == "try" else _CLOSE_WAIT_US
        grants = await self.providers.take(provider, mode, len(jobs), horizon)
        return [None] * len(jobs) if grants is None else list(grants)

    async def _wait_for_token(self, provider: str, grant: Grant | None) -> Grant | None:
        """Wait in place for a token due within :data:`CLOSE_WAIT`, or for a wake-up slot
        that close and then the token; None once the job may send, else the refusal that
        says how much longer it is.
        """
        while grant is not None and grant.queued and grant.wait <= CLOSE_WAIT:
            await asyncio.sleep(grant.wait)
            grant = await self._token(provider, "queued")
        if grant is None:
            return None
        if grant.granted:
            # The slot is on the server's clock, measured from its answer: sleeping the
            # wait from here never sends early, whatever this machine's clock says.
            await asyncio.sleep(grant.wait)
            return None
        return grant

    async def _counted(self, doc: Document, avoid: str | None, sharing: int) -> Sender:
        """The pool of the outbox whose turn it is among the ``sharing`` outboxes of
        ``doc``'s provider, its turn counted.
        """
        if sharing == 1:  # no turns to take: a plain count
            taken = await self.outboxes.count_turn(doc, avoid, guarded=False)
            return await self._pool(outbox_from_document(taken, self.vault))
        # One turn at a time per domain in this process: the conditional increment then
        # only ever races other processes, never the hundred jobs in flight here.
        async with self._turns[doc["domain"]]:
            taken = await self.outboxes.count_turn(doc, avoid)
        return await self._pool(outbox_from_document(taken, self.vault))

    async def _pool(self, outbox: Outbox) -> Sender:
        known = self._pools.get(outbox.name)
        if known is not None and known.outbox.version == outbox.version:
            return known
        if known is not None:  # the outbox changed: its old connections go
            await known.close()
        size = outbox.max_connections or self.pool_size
        pool: Sender
        if outbox.transport == "sendmail":
            pool = SendmailPipe(outbox, size)
        else:
            pool = SMTPPool(outbox, size, self.idle_seconds)
        self._pools[outbox.name] = pool
        return pool

    async def close(self) -> None:
        """Close every pool's idle connections."""
        for pool in self._pools.values():
            await pool.close()
        await self.requested.close()


def _throttle(outbox: str, provider: str, grant: Grant, answered: datetime) -> Throttle:
    """The wait a queueing grant asks for, its slot (on the server's clock) translated to
    this machine's by the time the answer came.
    """
    until = answered + timedelta(seconds=grant.wait)
    return Throttle(Reservation(outbox, provider, grant.slot_us), until)
