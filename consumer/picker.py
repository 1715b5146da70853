"""Choosing the outbox a job leaves through, and lending its connection pool.

Among the domain's active outboxes, the least used one whose provider has a token now
sends (round robin under the providers' limits). When no provider has a token, the
earliest one is reserved and the job waits for it in the delay ladder; it then sends
through the outbox it reserved without taking another token.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from consumer.outbox_store import OutboxStore, outbox_from_document
from consumer.outboxes import Outbox
from consumer.provider_store import ProviderStore
from consumer.ratelimit import Grant, Reservation
from consumer.sendmail import SendmailPipe
from consumer.store import Document, utcnow
from consumer.transport import Sender, SMTPPool
from consumer.vault import Vault


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
        outboxes: OutboxStore,
        providers: ProviderStore,
        vault: Vault | None,
        default: Outbox | None,
        pool_size: int,
        idle_seconds: float,
    ) -> None:
        self.outboxes = outboxes
        self.providers = providers
        self.vault = vault
        self.default = default
        self.pool_size = pool_size
        self.idle_seconds = idle_seconds
        self._pools: dict[str, Sender] = {}

    async def choose(self, domain: str, avoid: str | None = None) -> Choice | None:
        """The outbox whose turn it is among those whose provider allows a send now
        (``avoid`` only when no other can), else a reservation of the earliest token.

        The default outbox (no limits) when the domain has none; None without a default.
        """
        candidates = await self.outboxes.active(domain)
        if not candidates:
            return Choice(await self._pool(self.default)) if self.default is not None else None
        ordered = [c for c in candidates if c["_id"] != avoid] + [
            c for c in candidates if c["_id"] == avoid
        ]
        # With one provider, a refusal would be followed by a reservation: ask for it at once.
        reserve = len({c.get("provider") for c in ordered}) == 1
        refused: dict[str, tuple[Grant, Document]] = {}
        for doc in ordered:
            provider: str | None = doc.get("provider")
            if provider is None:  # no provider, no limit
                return Choice(await self._counted(doc, avoid))
            if provider in refused:
                continue
            grant = await self.providers.take(provider, reserve=reserve)
            if grant is None or (grant.granted and grant.wait <= 0):
                return Choice(await self._counted(doc, avoid))
            if grant.granted:
                return await self._throttled(doc, avoid, provider, grant)
            refused[provider] = (grant, doc)
        # Nobody may send now: queue for the provider whose token comes first.
        provider = min(refused, key=lambda name: refused[name][0].slot_us)
        grant = await self.providers.take(provider, reserve=True)
        if grant is None or grant.wait <= 0:
            return Choice(await self._counted(refused[provider][1], avoid))
        return await self._throttled(refused[provider][1], avoid, provider, grant)

    async def reserved(self, reservation: Reservation) -> Choice | None:
        """The outbox a throttled job reserved, while its slot is usable by the server's
        clock (a throttle again if the job came early); None when the slot went stale or
        the outbox was disabled or removed since: the job then chooses afresh.
        """
        now_us = await self.providers.now_us()
        seen = utcnow()
        if now_us > reservation.slot_us + reservation.spacing_us:
            return None
        doc = await self.outboxes.get(reservation.outbox)
        if doc is None or not doc.get("active", True):
            return None
        pool = await self._pool(outbox_from_document(doc, self.vault))
        if now_us >= reservation.slot_us:
            return Choice(pool)
        until = seen + timedelta(microseconds=reservation.slot_us - now_us)
        return Choice(pool, Throttle(reservation, until))

    async def _throttled(
        self, doc: Document, avoid: str | None, provider: str, grant: Grant
    ) -> Choice:
        # The slot is on the server's clock: translate it while the answer is fresh.
        until = utcnow() + timedelta(seconds=grant.wait)
        pool = await self._counted(doc, avoid)
        reservation = Reservation(pool.outbox.name, provider, grant.slot_us, grant.spacing_us)
        return Choice(pool, Throttle(reservation, until))

    async def _counted(self, doc: Document, avoid: str | None) -> Sender:
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
