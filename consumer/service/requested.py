"""The SMTP servers jobs bring sealed (``smtp_sealed``), opened and lent as pools.

Pools rather than a connection per mail: a gateway client that names its own server
names it for mail after mail, and a pooled connection saves each of them the TCP and TLS
handshakes and AUTH. They are bounded: at most :data:`MAX_SERVERS` pools, the least
recently used closed first (its sends in flight finish; their connections are then reaped
as idle), each of at most ``MAILBUS_SMTP_POOL_SIZE`` connections.

Such mail is held by no provider's rate limit: the request chose the server, not an outbox.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from consumer.core.refusals import InvalidJobError
from consumer.core.smtp_request import request_outbox, url_sealed_for
from consumer.errors import ConfigurationError
from consumer.mail.transport import Sender, SMTPPool
from consumer.vault import Vault

MAX_SERVERS = 32


class RequestedServers:
    """Opens sealed SMTP servers and keeps a pool for each of the last few used."""

    def __init__(
        self, vault: Vault | None, *, timeout: float, pool_size: int, idle_seconds: float
    ) -> None:
        """``timeout``: for a server whose URL sets none (``MAILBUS_SMTP_TIMEOUT``)."""
        self.vault = vault
        self.timeout = timeout
        self.pool_size = pool_size
        self.idle_seconds = idle_seconds
        # Keyed by the opened URL: each token of the same server differs (Fernet's IV).
        self._pools: OrderedDict[str, Sender] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def connections(self) -> int:
        """Connections open to every requested server together (one metrics label)."""
        return sum(pool.connections for pool in list(self._pools.values()))

    def opened(self, token: str, domain: str, job_id: str) -> str:
        """The SMTP URL sealed in ``token`` for the job ``job_id`` of ``domain``;
        :class:`InvalidJobError` when no configured key opens it (forged, sealed with a key
        since removed, or no key at all) or it was sealed for another job: such a job can
        never be sent, so it is never retried.
        """
        if self.vault is None:
            raise InvalidJobError("smtp_sealed: this worker has no MAILBUS_SECRET_KEY to open it")
        try:
            text = self.vault.decrypt(token)
        except ConfigurationError:
            raise InvalidJobError(
                "smtp_sealed: no key in MAILBUS_SECRET_KEY opens it (forged, or sealed with a "
                "key since removed)"
            ) from None
        return url_sealed_for(text, domain, job_id)

    async def pool(self, token: str, domain: str, job_id: str) -> Sender:
        """The pool of the server sealed in ``token`` for the job ``job_id`` of ``domain``
        (see :meth:`opened` for refusals).
        """
        url = self.opened(token, domain, job_id)
        pool = self._pools.pop(url, None)
        if pool is None:
            try:
                outbox = request_outbox(url, timeout=self.timeout)
            except ConfigurationError as exc:  # sealed by a key holder, yet not a server
                raise InvalidJobError(f"smtp_sealed: {exc}") from None
            pool = SMTPPool(outbox, self.pool_size, self.idle_seconds)
        self._pools[url] = pool
        while len(self._pools) > MAX_SERVERS:
            _, evicted = self._pools.popitem(last=False)
            # Closed aside: a slow server's QUIT must not hold up the job that evicted it.
            closing = asyncio.create_task(evicted.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        return pool

    async def close(self) -> None:
        """Close every pool's idle connections (those evicted before too)."""
        for pool in self._pools.values():
            await pool.close()
        if self._closing:
            await asyncio.wait(set(self._closing))
