"""Who may send for a domain, and what a worker's copy of a job vouches for.

A job sends for a registered domain with its key, or when it was published by one of the
domain's allowed broker users (the AMQP ``user_id``, which RabbitMQ checks against the
connection's login). An open (unregistered) domain needs neither, unless
``MAILBUS_OPEN_DOMAINS`` is off. Either way the sender's address must belong to the job's
domain: a registered domain's own senders list (default: itself and its subdomains), and
for an open domain any address not under a registered domain.

The copies a worker publishes (the delay ladder, retries, dead letters) cannot re-assert
``user_id``, and they never keep the domain key: that secret would sit in queues and
records for anyone who reads them. In their place a copy carries an :class:`Authority`
(the broker user, the domain it was authorized for, a released lease) under a *seal*: an
HMAC with ``MAILBUS_SECRET_KEY`` over the authority, the message id, the body and an
expiry. Producers can copy a seal but not move it to another id or body, and every
``x-mailbus-*`` header a delivery carries without a valid seal is dropped on intake.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar
from urllib.parse import unquote, urlsplit

from consumer.core.api_keys import api_key_problem
from consumer.core.headers import (
    DOMAIN_HEADER,
    OWN_PREFIX,
    PRODUCER_HEADERS,
    SEAL_HEADER,
    SEALED_HEADERS,
    USER_HEADER,
)
from consumer.core.leases import Release, released
from consumer.core.message import Job
from consumer.core.schedule import to_epoch_ms
from consumer.store.documents import Document
from consumer.store.domains import DomainStore, key_matches
from consumer.vault import Vault

# How long a worker trusts what it read of a domain: changes apply within this time.
CACHE_SECONDS = 5.0
_MAX_REMEMBERED = 10_000
Answer = TypeVar("Answer")
# A domain_key field in a body that is not strict JSON, to redact in the raw bytes.
_RAW_KEY = re.compile(rb'"domain_key"\s*:\s*"(?:[^"\\]|\\.)*"')
_REDACTED = b'"domain_key":"***"'
_FIELD = "domain_key"
# A seal as workers write it: epoch milliseconds (13 digits until the year 2286), a dot,
# and an HMAC-SHA256 in hex.
_SEAL_SHAPE = re.compile(r"[0-9]{1,15}\.[0-9a-f]{64}")
# The encodings besides UTF-8 that JSON allows (RFC 8259 §8.1 of old, and Python's decoder).
_WIDE_ENCODINGS = ("utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be")


def broker_login(amqp_url: str) -> str:
    """The RabbitMQ user ``amqp_url`` logs in as: the only ``user_id`` it may publish with."""
    return unquote(urlsplit(amqp_url).username or "guest")


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class Authority:
    """What a delivery speaks for beyond its body: the broker user it was published by,
    the domain it was authorized for already, and a lease a worker let go of for it.
    """

    user: str | None = None
    domain: str | None = None
    release: Release | None = None

    def headers(self) -> dict[str, Any]:
        """The authority as the headers a seal covers."""
        fields: dict[str, Any] = {}
        if self.user is not None:
            fields[USER_HEADER] = self.user
        if self.domain is not None:
            fields[DOMAIN_HEADER] = self.domain.lower()
        if self.release is not None:
            fields |= self.release.headers()
        return fields


def _sealed(message_id: str | None, body: bytes, expires_ms: int, fields: Document) -> bytes:
    what = ["seal", message_id or "", hashlib.sha256(body).hexdigest(), expires_ms, fields]
    return json.dumps(what, sort_keys=True, ensure_ascii=True).encode()


def seal(
    headers: Mapping[str, Any],
    authority: Authority,
    *,
    message_id: str | None,
    body: bytes,
    vault: Vault | None,
    expires: datetime,
) -> dict[str, Any]:
    """``headers`` for a worker's copy of a job with ``message_id`` and ``body``: any
    authority they held replaced by ``authority``, sealed until ``expires``. Without
    ``MAILBUS_SECRET_KEY`` nothing can be sealed and the copy carries no authority.
    """
    carried = {k: v for k, v in headers.items() if k not in SEALED_HEADERS and k != SEAL_HEADER}
    fields = authority.headers()
    if vault is None or not fields:
        return carried
    expires_ms = to_epoch_ms(expires)
    signature = vault.sign(_sealed(message_id, body, expires_ms, fields))
    return carried | fields | {SEAL_HEADER: f"{expires_ms}.{signature}"}


def _unsealed(
    headers: Mapping[str, Any],
    message_id: str | None,
    body: bytes,
    vault: Vault | None,
    now: datetime,
) -> Authority:
    """The authority ``headers`` carry when their seal holds; else none."""
    stamp = _text(headers.get(SEAL_HEADER))
    if vault is None or stamp is None:
        return Authority()
    expires, _, signature = stamp.partition(".")
    # The producer's text: only a stamp of the shape workers write is looked at further.
    if not _SEAL_SHAPE.fullmatch(stamp) or int(expires) < to_epoch_ms(now):
        return Authority()
    user, domain = _text(headers.get(USER_HEADER)), _text(headers.get(DOMAIN_HEADER))
    try:
        release = released(headers)
    except (ValueError, OverflowError, OSError):  # a release time no clock can hold
        return Authority()
    authority = Authority(user or None, domain or None, release)
    fields = authority.headers()
    if not fields or not vault.verify(_sealed(message_id, body, int(expires), fields), signature):
        return Authority()
    return authority


@dataclass(frozen=True)
class Intake:
    """A delivery as a worker takes it in: what it vouches for, and the headers it keeps."""

    authority: Authority
    headers: dict[str, Any]


def intake(
    headers: Mapping[str, Any],
    *,
    user_id: str | None,
    message_id: str | None,
    body: bytes,
    vault: Vault | None,
    now: datetime,
) -> Intake:
    """Take a delivery in: the AMQP ``user_id`` (checked by RabbitMQ) or else the sealed
    user, the sealed domain and release; every other ``x-mailbus-*`` header a producer
    may have set is dropped, so none of them carries anything further.
    """
    sealed = _unsealed(headers, message_id, body, vault, now)
    authority = Authority(user_id or sealed.user, sealed.domain, sealed.release)
    kept = {
        k: v
        for k, v in headers.items()
        if not k.lower().startswith(OWN_PREFIX) or k in PRODUCER_HEADERS
    }
    return Intake(authority, kept | sealed.headers())


def without_domain_key(body: bytes, *, parse: bool = True) -> bytes:
    """The job ``body`` without its ``domain_key``: re-encoded when it is a JSON object,
    else with the field redacted in the raw bytes. A body that may still hold a key past
    that (the field's name in UTF-16 or UTF-32, or an escape that could spell it) is
    replaced by a note saying it was dropped. ``parse`` False: a body too large to decode
    (``MAILBUS_MAX_JOB_BYTES``) is only ever redacted in its raw bytes, which costs no
    more than a copy of it.
    """
    job = None
    if parse:
        try:
            job = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            job = None
    if isinstance(job, dict):
        if "domain_key" not in job:
            return body
        del job["domain_key"]
        return json.dumps(job, ensure_ascii=False).encode()
    redacted = _RAW_KEY.sub(_REDACTED, body)
    if _could_hold_key(redacted):
        note = {"dropped": f"a body of {len(body)} bytes that could hold a domain key"}
        return json.dumps(note).encode()
    return redacted


def _could_hold_key(raw: bytes) -> bool:
    if b"\\" in raw or raw.count(_FIELD.encode()) != raw.count(_REDACTED):
        return True
    return any(_FIELD.encode(wide) in raw for wide in _WIDE_ENCODINGS)


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


async def api_key_matches(keys: VerifiedKeys, doc: Document, key: str) -> bool:
    """Whether ``key`` is one of the REST API keys of the domain registered as ``doc``
    (a key no API key could be is not hashed at all).
    """
    if api_key_problem(key) is not None:
        return False
    for entry in doc.get("api_keys", []):
        stored = entry.get("key_hash")
        if isinstance(stored, str) and await keys.matches(key, stored):
            return True
    return False


def _under(name: str, domain: str) -> bool:
    """Whether ``name`` is ``domain`` or one of its subdomains."""
    return name == domain or name.endswith("." + domain)


def _suffixes(name: str) -> list[str]:
    """``a.b.example`` -> ``a.b.example``, ``b.example``, ``example``."""
    labels = name.split(".")
    return [".".join(labels[i:]) for i in range(len(labels))]


class Recent(Generic[Answer]):
    """Answers by name, each kept for ``CACHE_SECONDS`` (at most ``_MAX_REMEMBERED``)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._kept: dict[str, tuple[float, Answer]] = {}

    async def get(self, name: str, load: Callable[[], Awaitable[Answer]]) -> Answer:
        """The answer for ``name``: the kept one while fresh, else ``load``'s."""
        now = self._clock()
        kept = self._kept.get(name)
        if kept is not None and now - kept[0] < CACHE_SECONDS:
            return kept[1]
        answer = await load()
        if len(self._kept) >= _MAX_REMEMBERED:
            self._kept.clear()
        self._kept[name] = (now, answer)
        return answer


class Authorizer:
    """Decides whether a job, or a control request, may act for a domain, remembering
    domains for a few seconds and keys it has verified.
    """

    def __init__(
        self,
        domains: DomainStore,
        *,
        open_domains: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.domains = domains
        self.open_domains = open_domains
        self.clock = clock
        self._domains: Recent[Document | None] = Recent(clock)
        self._owners: Recent[str | None] = Recent(clock)
        self._keys = VerifiedKeys()

    async def refusal(self, job: Job, authority: Authority) -> str | None:
        """Why the job may not send for its domain, or None when it may. A copy sealed as
        authorized for the job's domain needs no key again.
        """
        domain = job.domain.lower()
        doc = await self.domain(domain)
        if authority.domain != domain:
            key = job.domain_key.get_secret_value() if job.domain_key is not None else None
            refused = await self.credential_refusal(domain, doc, key, authority.user)
            if refused is not None:
                return refused
        return await self._sender_refusal(job, domain, doc)

    async def credential_refusal(
        self, domain: str, doc: Document | None, key: str | None, user: str | None
    ) -> str | None:
        """Why ``key`` or broker ``user`` may not act for ``domain`` (registered as ``doc``,
        None when open), or None when they may.
        """
        if doc is None:
            if self.open_domains:
                return None
            return f"domain {domain} is not registered, and open domains are refused"
        stored = doc.get("key_hash")
        if key is not None and stored and await self._keys.matches(key, stored):
            return None
        if user is not None and user in doc.get("allow_users", []):
            return None
        if key is not None:
            return f"wrong domain key for {domain}"
        if user is not None:
            return f"no domain key, and broker user {user!r} may not send for {domain}"
        return f"no domain key for {domain}, and no allowed broker user"

    async def _sender_refusal(self, job: Job, domain: str, doc: Document | None) -> str | None:
        """Why the job's senders (its From; a raw job's envelope sender and From) may not
        be used by ``domain``, or None.
        """
        for address in dict.fromkeys(job.sender_addresses()):
            refused = await self._address_refusal(address.rpartition("@")[2].lower(), domain, doc)
            if refused is not None:
                return refused
        return None

    async def _address_refusal(self, sender: str, domain: str, doc: Document | None) -> str | None:
        """Why ``domain`` (registered as ``doc``, None when open) may not send as the
        sender domain ``sender``, or None.
        """
        if doc is not None:
            allowed = doc.get("senders") or [domain]
            if any(_under(sender, a) for a in allowed):
                return None
            return f"sender domain {sender} is not one {domain} may send as"
        owner = await self._owner(sender)
        if owner is None:
            return None
        return f"sender domain {sender} belongs to a registered domain, not to {domain}"

    async def _owner(self, name: str) -> str | None:
        """The registered domain ``name`` is, or is under; None when there is none."""

        async def closest() -> str | None:
            found = await self.domains.registered(_suffixes(name))
            return next((s for s in _suffixes(name) if s in found), None)

        return await self._owners.get(name, closest)

    async def domain(self, name: str) -> Document | None:
        """The registration of domain ``name`` (None: not registered), at most
        ``CACHE_SECONDS`` old.
        """
        domain = name.lower()
        return await self._domains.get(domain, lambda: self.domains.get(domain))
