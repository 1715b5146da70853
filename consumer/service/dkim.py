"""DKIM signing in the worker: the signing key of a job's domain, read from its
registration and decrypted with ``MAILBUS_SECRET_KEY``, kept for a few seconds.

A domain signs with its active key (``mailbus domain dkim``); a domain without one, or not
registered, sends unsigned. A key that cannot be used (no ``MAILBUS_SECRET_KEY``, a key
that no configured key decrypts, a stored key that is not a key) is a configuration error:
the job is deferred and retried like any transient failure, and the error is logged each
time, rather than sent unsigned where its domain's policy may have it refused.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from consumer.core.dkim import DkimKey, sign_mail, signing_key
from consumer.core.mime import Mail
from consumer.errors import ConfigurationError
from consumer.logging import get_logger
from consumer.service.authorization import Recent
from consumer.store.domains import DomainStore
from consumer.vault import Vault

log = get_logger(__name__)


class DkimSigner:
    """Signs mail with its domain's DKIM key; decrypted keys are kept for
    ``CACHE_SECONDS`` (a changed or removed key applies within that time).
    """

    def __init__(
        self,
        domains: DomainStore,
        vault: Vault | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.domains = domains
        self.vault = vault
        self._keys: Recent[DkimKey | None] = Recent(clock)

    async def key_for(self, domain: str) -> DkimKey | None:
        """The key that signs ``domain``'s mail, or None when it has none; raises
        :class:`ConfigurationError` when it has one that cannot be used.
        """
        name = domain.lower()
        return await self._keys.get(name, lambda: self._load(name))

    async def _load(self, domain: str) -> DkimKey | None:
        entry = await self.domains.signing_dkim_key(domain)
        if entry is None:
            return None
        selector = str(entry.get("selector"))
        where = f"the DKIM key {selector!r} of {domain}"
        if self.vault is None:
            raise ConfigurationError(f"{where} needs MAILBUS_SECRET_KEY to be decrypted")
        try:
            pem = self.vault.decrypt(str(entry.get("private_key"))).encode()
            return signing_key(domain, selector, pem)
        except ConfigurationError:
            raise ConfigurationError(
                f"{where} cannot be decrypted with MAILBUS_SECRET_KEY "
                "(was the key that encrypted it removed?)"
            ) from None
        except ValueError as exc:
            raise ConfigurationError(f"{where} is unusable: {exc}") from None

    async def sign(self, mail: Mail, domain: str) -> Mail:
        """``mail`` signed with ``domain``'s key, a fresh signature over its wire bytes;
        ``mail`` itself when the domain has no key. Raises :class:`ConfigurationError`
        (logged) when its key cannot be used.
        """
        try:
            key = await self.key_for(domain)
        except ConfigurationError as exc:
            # An operator's mistake, and what it costs is mail held back: said loudly.
            log.error("dkim.key_unusable", error=str(exc))  # noqa: TRY400 (no traceback to see)
            raise
        if key is None:
            return mail
        # dkimpy's RSA is pure Python (some 6 ms a signature): off the event loop, which
        # then keeps serving other deliveries and the broker's heartbeats meanwhile.
        return await asyncio.to_thread(sign_mail, mail, key)
