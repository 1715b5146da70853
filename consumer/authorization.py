"""Who may send for a domain: its key in the job, or an allowed broker user.

The broker user of a producer's message is its AMQP ``user_id``, which RabbitMQ checks
against the connection's login. The copies a worker publishes (retries, the delay ladder)
cannot re-assert it, so they carry it in a header signed with ``MAILBUS_SECRET_KEY`` over
the user and the body; a header a producer forges fails the check and is ignored.

A dead letter never keeps the job's domain key: that secret would sit in the dead-letter
queue for anyone who reads it. In its place, a job that was authorized carries its
domain signed the same way, so a replay of it is still authorized.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from consumer.domain_store import DomainStore, key_matches
from consumer.message import Job
from consumer.store import Document
from consumer.vault import Vault

USER_HEADER = "x-mailbus-user"
USER_SIGNATURE_HEADER = "x-mailbus-user-signature"
DOMAIN_HEADER = "x-mailbus-authorized-domain"
DOMAIN_SIGNATURE_HEADER = "x-mailbus-authorized-domain-signature"
# How long a worker trusts what it read of a domain: changes apply within this time.
CACHE_SECONDS = 5.0
_MAX_REMEMBERED = 10_000


def broker_login(amqp_url: str) -> str:
    """The RabbitMQ user ``amqp_url`` logs in as: the only ``user_id`` it may publish with."""
    return unquote(urlsplit(amqp_url).username or "guest")


def _signed(user: str, body: bytes) -> bytes:
    return b"user\0" + user.encode() + b"\0" + hashlib.sha256(body).digest()


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def broker_user(
    user_id: str | None, headers: Mapping[str, Any], body: bytes, vault: Vault | None
) -> str | None:
    """The broker user a delivery speaks for: the AMQP ``user_id`` of a producer's message,
    or on a worker's copy the user it carried, if its signature holds.
    """
    if user_id:
        return user_id
    user = _text(headers.get(USER_HEADER))
    signature = _text(headers.get(USER_SIGNATURE_HEADER))
    if vault is None or not user or not signature:
        return None
    return user if vault.verify(_signed(user, body), signature) else None


def carry_user(
    headers: Mapping[str, Any], user: str | None, body: bytes, vault: Vault | None
) -> dict[str, Any]:
    """``headers`` for a copy of a job: the user signed in, anything claimed before out."""
    carried = {k: v for k, v in headers.items() if k not in (USER_HEADER, USER_SIGNATURE_HEADER)}
    if user is not None and vault is not None:
        carried[USER_HEADER] = user
        carried[USER_SIGNATURE_HEADER] = vault.sign(_signed(user, body))
    return carried


def _vouched(domain: str, body: bytes) -> bytes:
    return b"domain\0" + domain.lower().encode() + b"\0" + hashlib.sha256(body).digest()


def vouched_domain(headers: Mapping[str, Any], body: bytes, vault: Vault | None) -> str | None:
    """The domain a dead letter's replay was authorized for, if its signature holds."""
    domain = _text(headers.get(DOMAIN_HEADER))
    signature = _text(headers.get(DOMAIN_SIGNATURE_HEADER))
    if vault is None or not domain or not signature:
        return None
    return domain.lower() if vault.verify(_vouched(domain, body), signature) else None


def without_domain_key(body: bytes) -> bytes | None:
    """The job ``body`` without its ``domain_key``; None when it has none to remove."""
    try:
        job = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(job, dict) or "domain_key" not in job:
        return None
    del job["domain_key"]
    return json.dumps(job, ensure_ascii=False).encode()


def dead_letter_parts(
    body: bytes,
    headers: Mapping[str, Any],
    user: str | None,
    authorized: str | None,
    vault: Vault | None,
) -> tuple[bytes, dict[str, Any]]:
    """The body and headers of a job's dead letter: the body without its domain key, the
    broker user signed over that body, and ``authorized`` (the domain the job was
    authorized for, if it was) signed in place of the key. Without ``MAILBUS_SECRET_KEY``
    nothing can be signed: a replay of a registered domain's job is then refused.
    """
    stripped = without_domain_key(body)
    carried = {
        k: v for k, v in headers.items() if k not in (DOMAIN_HEADER, DOMAIN_SIGNATURE_HEADER)
    }
    if stripped is None:
        # Nothing to strip: what the letter already carries stays valid.
        return body, dict(headers)
    carried = carry_user(carried, user, stripped, vault)
    if authorized is not None and vault is not None:
        carried[DOMAIN_HEADER] = authorized.lower()
        carried[DOMAIN_SIGNATURE_HEADER] = vault.sign(_vouched(authorized, stripped))
    return stripped, carried


class VerifiedKeys:
    """Checks keys against stored hashes, remembering the pairs that matched: a key hash is
    slow to compute on purpose, and the same key comes with every job.
    """

    def __init__(self) -> None:
        self._verified: set[tuple[str, bytes]] = set()

    async def matches(self, key: str, stored: str) -> bool:
        """Whether ``key`` is the one ``stored`` was hashed from (off the event loop)."""
        seen = (stored, hashlib.sha256(key.encode()).digest())
        if seen in self._verified:
            return True
        if not await asyncio.to_thread(key_matches, key, stored):
            return False
        if len(self._verified) >= _MAX_REMEMBERED:
            self._verified.clear()
        self._verified.add(seen)
        return True


class Authorizer:
    """Decides whether a job may send for its domain, remembering domains for a few
    seconds and keys it has verified (a key hash is slow to compute on purpose).
    """

    def __init__(self, domains: DomainStore, clock: Callable[[], float] = time.monotonic):
        self.domains = domains
        self.clock = clock
        self._domains: dict[str, tuple[float, Document | None]] = {}
        self._keys = VerifiedKeys()

    async def refusal(self, job: Job, user: str | None, vouched: str | None = None) -> str | None:
        """Why the job may not send for its domain, or None when it may; ``vouched`` is
        the domain a replayed dead letter was signed as authorized for.
        """
        doc = await self.domain(job.domain)
        if doc is None or vouched == job.domain.lower():
            return None
        key = job.domain_key.get_secret_value() if job.domain_key is not None else None
        stored = doc.get("key_hash")
        if key is not None and stored and await self._keys.matches(key, stored):
            return None
        if user is not None and user in doc.get("allow_users", []):
            return None
        if key is not None:
            return f"wrong domain key for {job.domain}"
        if user is not None:
            return f"no domain key, and broker user {user!r} may not send for {job.domain}"
        return f"no domain key for {job.domain}, and no allowed broker user"

    async def domain(self, name: str) -> Document | None:
        """The registration of domain ``name`` (None: not registered), at most
        ``CACHE_SECONDS`` old.
        """
        domain = name.lower()
        now = self.clock()
        cached = self._domains.get(domain)
        if cached is not None and now - cached[0] < CACHE_SECONDS:
            return cached[1]
        doc = await self.domains.get(domain)
        self._domains[domain] = (now, doc)
        return doc
