"""Registered sending domains in MongoDB: a salted hash of the domain key, allowed users,
the sender domains its mail may use, the salted hashes of its REST API keys, its DKIM
keys (``dkim_keys``: selector, algorithm, the private key encrypted with
``MAILBUS_SECRET_KEY``; ``dkim_active``: the selector that signs), its sandbox mode and
its own bounce domain (``bounce_domain``, where its mail's return addresses are).

A domain that is not registered is open: any job may send for it (unless
``MAILBUS_OPEN_DOMAINS`` is off), with a From that is not under a registered domain. A
registered domain requires the job's ``domain_key`` to match, or the message to come from
one of its allowed broker users (the AMQP ``user_id``, which RabbitMQ validates against the
connection); its From must be under one of its sender domains (default: itself).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from typing import Literal

import argon2
import bcrypt
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from consumer.clock import utcnow
from consumer.store.documents import Document, answering

# scrypt's cost: about 16 MiB and tens of milliseconds per hash, so a leaked table is slow
# to attack; workers verify a key once and remember the answer.
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def _scrypt(key: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(key.encode(), salt=salt, n=n, r=r, p=p, maxmem=64 * 2**20, dklen=32)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def hash_key(key: str) -> str:
    """``key`` hashed with a fresh salt: ``scrypt$n$r$p$salt$hash`` (never the key itself)."""
    salt = secrets.token_bytes(16)
    digest = _scrypt(key, salt, **_SCRYPT)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${_b64(salt)}${_b64(digest)}"


def key_matches(key: str, stored: str) -> bool:
    """Whether ``key`` is the one :func:`hash_key` made ``stored`` from, or, pasted from
    the old daemon's ``MAILER_AUTH_HASH``, a bcrypt (``$2y$``...) or Argon2 (``$argon2i$``,
    libsodium's ``$argon2id$``) hash of it.
    """
    if stored.startswith(_BCRYPT_PREFIXES):
        return _bcrypt_matches(key, stored)
    if stored.startswith(_ARGON2_PREFIXES):
        return _argon2_matches(key, stored)
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        computed = _scrypt(key, base64.b64decode(salt), int(n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(computed, base64.b64decode(digest))


_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
_ARGON2_PREFIXES = ("$argon2i$", "$argon2id$")
# bcrypt reads no more than 72 bytes of a password (PHP's password_verify cut it there).
_BCRYPT_MAX_BYTES = 72


def _bcrypt_matches(key: str, stored: str) -> bool:
    try:
        return bcrypt.checkpw(key.encode()[:_BCRYPT_MAX_BYTES], stored.encode())
    except ValueError:  # not a well-formed bcrypt hash
        return False


def _argon2_matches(key: str, stored: str) -> bool:
    try:
        return argon2.PasswordHasher().verify(stored, key)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


class DomainStore:
    """The ``domains`` collection (``_id`` is the lower-case domain)."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self.domains = database["domains"]

    async def put(
        self,
        domain: str,
        key_hash: str | None,
        users: Sequence[str],
        replace: bool,
        senders: Sequence[str] = (),
    ) -> bool:
        """Register ``domain``; an existing one is replaced only with ``replace``. False when
        it exists and ``replace`` is off. ``senders``: the domains its From may be under
        (empty: the domain itself).
        """
        doc = {
            "_id": domain.lower(),
            "key_hash": key_hash,
            "allow_users": sorted(set(users)),
            "senders": sorted({s.lower() for s in senders}),
            "updated_at": utcnow(),
        }
        async with answering():
            if replace:
                # Every field but the API and DKIM keys, which their own commands manage.
                fields = {k: v for k, v in doc.items() if k != "_id"}
                await self.domains.update_one({"_id": doc["_id"]}, {"$set": fields}, upsert=True)
                return True
            try:
                await self.domains.insert_one(doc)
            except DuplicateKeyError:
                return False
        return True

    async def find(self) -> list[Document]:
        """Every registered domain, by name."""
        async with answering():
            return [doc async for doc in self.domains.find({}).sort("_id", 1)]

    async def get(self, domain: str) -> Document | None:
        """One registered domain, or None when it is open."""
        async with answering():
            return await self.domains.find_one({"_id": domain.lower()})

    async def registered(self, names: Sequence[str]) -> set[str]:
        """Which of ``names`` (lower case) are registered: one query for all."""
        async with answering():
            cursor = self.domains.find({"_id": {"$in": list(names)}}, {"_id": 1})
            return {doc["_id"] async for doc in cursor}

    async def add_api_key(
        self, domain: str, name: str, key_hash: str, limit: int
    ) -> Literal["added", "unregistered", "exists", "full"]:
        """Add an API key (its hash) named ``name`` to a registered domain that has fewer
        than ``limit``; else say why not.
        """
        entry = {"name": name, "key_hash": key_hash, "created_at": utcnow()}
        async with answering():
            result = await self.domains.update_one(
                {
                    "_id": domain.lower(),
                    "api_keys.name": {"$ne": name},
                    f"api_keys.{limit - 1}": {"$exists": False},
                },
                {"$push": {"api_keys": entry}},
            )
            if result.modified_count == 1:
                return "added"
            doc = await self.domains.find_one({"_id": domain.lower()})
        if doc is None:
            return "unregistered"
        if any(key.get("name") == name for key in doc.get("api_keys", [])):
            return "exists"
        return "full"

    async def remove_api_key(self, domain: str, name: str) -> bool:
        """Remove the API key ``name`` of ``domain``; False when there is none."""
        async with answering():
            result = await self.domains.update_one(
                {"_id": domain.lower(), "api_keys.name": name},
                {"$pull": {"api_keys": {"name": name}}},
            )
        return result.modified_count == 1

    async def set_sandbox(self, domain: str, sandbox: bool) -> bool:
        """Turn ``domain``'s sandbox mode on or off (its mail is then not delivered, or only
        to the sandbox outbox); False when it is not registered. A ``put`` with ``replace``
        keeps it: only this changes it.
        """
        async with answering():
            result = await self.domains.update_one(
                {"_id": domain.lower()},
                {"$set": {"sandbox": sandbox, "updated_at": utcnow()}},
            )
        return result.matched_count == 1

    async def set_bounce_domain(self, domain: str, bounce_domain: str | None) -> bool:
        """Give ``domain`` a bounce domain of its own (its mail's return addresses are
        there), or none (None: MAILBUS_BOUNCE_DOMAIN's again); False when it is not
        registered. A ``put`` with ``replace`` keeps it: only this changes it.
        """
        change: Document = (
            {"$set": {"bounce_domain": bounce_domain.lower(), "updated_at": utcnow()}}
            if bounce_domain is not None
            else {"$unset": {"bounce_domain": ""}, "$set": {"updated_at": utcnow()}}
        )
        async with answering():
            result = await self.domains.update_one({"_id": domain.lower()}, change)
        return result.matched_count == 1

    async def add_dkim_key(
        self, domain: str, entry: Document, *, activate: bool, limit: int
    ) -> Literal["added", "unregistered", "exists", "full"]:
        """Add a DKIM key ``entry`` (``selector``, ``algorithm``, ``private_key`` encrypted)
        to a registered domain that has fewer than ``limit``, else say why not. It signs
        when ``activate`` is set or when the domain had no signing key.
        """
        domain = domain.lower()
        selector = entry["selector"]
        async with answering():
            result = await self.domains.update_one(
                {
                    "_id": domain,
                    "dkim_keys.selector": {"$ne": selector},
                    f"dkim_keys.{limit - 1}": {"$exists": False},
                },
                {"$push": {"dkim_keys": {**entry, "created_at": utcnow()}}},
            )
            if result.modified_count == 1:
                # A later key waits for its DNS record unless told to sign now.
                match = {"_id": domain} if activate else {"_id": domain, "dkim_active": None}
                await self.domains.update_one(match, {"$set": {"dkim_active": selector}})
                return "added"
            doc = await self.domains.find_one({"_id": domain})
        if doc is None:
            return "unregistered"
        if selector in dkim_selectors(doc):
            return "exists"
        return "full"

    async def activate_dkim_key(self, domain: str, selector: str) -> bool:
        """Make ``selector`` the key that signs ``domain``'s mail; False when it has none."""
        async with answering():
            result = await self.domains.update_one(
                {"_id": domain.lower(), "dkim_keys.selector": selector},
                {"$set": {"dkim_active": selector}},
            )
        return result.matched_count == 1

    async def remove_dkim_key(
        self, domain: str, selector: str
    ) -> Literal["removed", "missing", "active"]:
        """Remove the DKIM key ``selector`` of ``domain``. The signing key goes only when
        it is the last one (the domain's mail is then unsigned); else "active".
        """
        domain = domain.lower()
        async with answering():
            result = await self.domains.update_one(
                {
                    "_id": domain,
                    "dkim_keys.selector": selector,
                    "$or": [
                        {"dkim_active": {"$ne": selector}},
                        {"dkim_keys.1": {"$exists": False}},
                    ],
                },
                {"$pull": {"dkim_keys": {"selector": selector}}},
            )
            if result.modified_count == 1:
                await self.domains.update_one(
                    {"_id": domain, "dkim_active": selector}, {"$unset": {"dkim_active": ""}}
                )
                return "removed"
            doc = await self.domains.find_one({"_id": domain})
        return "active" if doc is not None and selector in dkim_selectors(doc) else "missing"

    async def signing_dkim_key(self, domain: str) -> Document | None:
        """The DKIM key entry that signs ``domain``'s mail (its private key encrypted), or
        None: not registered, or no key.
        """
        async with answering():
            doc = await self.domains.find_one(
                {"_id": domain.lower()}, {"dkim_keys": 1, "dkim_active": 1}
            )
        if doc is None:
            return None
        active = doc.get("dkim_active")
        return next((k for k in doc.get("dkim_keys", []) if k.get("selector") == active), None)

    async def store_dkim_key(self, domain: str, selector: str, private_key: str) -> None:
        """Replace the encrypted private key of ``domain``'s ``selector`` (key rotation)."""
        async with answering():
            await self.domains.update_one(
                {"_id": domain, "dkim_keys.selector": selector},
                {"$set": {"dkim_keys.$.private_key": private_key}},
            )

    async def remove(self, domain: str) -> bool:
        """Unregister (the domain is open again); False if it was not registered."""
        async with answering():
            result = await self.domains.delete_one({"_id": domain.lower()})
        return result.deleted_count == 1


def describe(doc: Document) -> Document:
    """A domain document fit for printing: the key only as set or not, API keys by name,
    DKIM keys by selector (never a private key, even encrypted).
    """
    shown = {k: v for k, v in doc.items() if k not in ("key_hash", "api_keys", "dkim_keys")}
    shown["key"] = "set" if doc.get("key_hash") else None
    shown["sandbox"] = bool(doc.get("sandbox"))
    shown["bounce_domain"] = doc.get("bounce_domain")
    shown["api_keys"] = api_key_names(doc)
    shown["dkim_selectors"] = dkim_selectors(doc)
    return shown


def dkim_selectors(doc: Document) -> list[str]:
    """The selectors of a domain document's DKIM keys, oldest first."""
    return [str(key.get("selector")) for key in doc.get("dkim_keys", [])]


def api_key_names(doc: Document) -> list[str]:
    """The names of a domain document's API keys, oldest first."""
    return [str(key.get("name")) for key in doc.get("api_keys", [])]
