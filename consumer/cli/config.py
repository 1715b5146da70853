"""``mailbus config``: the whole configuration as one TOML file, for GitOps."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from consumer.cli.config_file import ConfigFile, export, load
from consumer.cli.parsing import Subparsers
from consumer.clock import utcnow
from consumer.core.replies import rules_of
from consumer.errors import ConfigurationError
from consumer.settings import Settings
from consumer.store.documents import Document
from consumer.store.domains import hash_key, key_matches
from consumer.store.mongo import Mongo
from consumer.store.outboxes import outbox_document
from consumer.store.providers import limits_of
from consumer.vault import Vault

# Fields of a stored outbox that importing the same file again leaves alone.
_BOOKKEEPING = {"updated_at", "created_at", "version", "sent_count", "active", "password"}


class Importer:
    """Applies a :class:`ConfigFile` to the stores, changing only what differs."""

    def __init__(
        self, mongo: Mongo, vault: Vault | None, env: Mapping[str, str], prune: bool
    ) -> None:
        self.providers = mongo.providers
        self.domains = mongo.domains
        self.outboxes = mongo.outboxes
        self.vault = vault
        self.env = env
        self.prune = prune
        self.report: list[str] = []

    async def apply(self, config: ConfigFile) -> None:
        """Providers first (outboxes refer to them), then domains, then outboxes; every
        secret the file names is checked before anything is written.
        """
        for name, domain in config.domains.items():
            if domain.key_env is not None:
                self._env(domain.key_env, f"domain {name}")
            if domain.bounce_domain is not None and self.vault is None:
                raise ConfigurationError(
                    f"domain {name}: a bounce domain needs MAILBUS_SECRET_KEY, which signs "
                    "each mail's return address"
                )
        stored = {doc["_id"]: doc for doc in await self.outboxes.find(encrypted=True)}
        for name, outbox in config.outboxes.items():
            kept = stored.get(name, {}).get("password")
            if outbox.password_env is not None and not kept:
                self._env(outbox.password_env, f"outbox {name}")
        await self._providers(config)
        await self._domains(config)
        await self._outboxes(config)

    async def _providers(self, config: ConfigFile) -> None:
        stored = {doc["_id"]: doc for doc in await self.providers.find()}
        for name, entry in config.providers.items():
            limits, rules, old = entry.parsed(), entry.rules(), stored.get(name)
            if old is not None and (limits_of(old), old.get("burst")) == (limits, entry.burst):
                # Re-applying must not refill the buckets (nor end a slowdown).
                if rules_of(old.get("replies")) != rules:
                    await self.providers.set_reply_rules(name, rules)
                    self._said("provider", name, False)
                continue
            await self.providers.put(name, limits, entry.burst, rules)
            self._said("provider", name, old is None)
        for name in stored.keys() - config.providers.keys() if self.prune else ():
            await self.providers.remove(name)
            self.report.append(f"provider {name}: removed")

    async def _domains(self, config: ConfigFile) -> None:
        stored = {doc["_id"]: doc for doc in await self.domains.find()}
        for name, entry in config.domains.items():
            name = name.lower()
            old = stored.get(name, {})
            key_hash = entry.key_hash
            if entry.key_env is not None:
                key = self._env(entry.key_env, f"domain {name}")
                kept = old.get("key_hash")
                key_hash = kept if kept and key_matches(key, kept) else hash_key(key)
            users = sorted(set(entry.allow_users))
            senders = sorted({s.lower() for s in entry.senders})
            same = bool(old) and (
                old.get("key_hash"),
                old.get("allow_users"),
                old.get("senders") or [],
            ) == (key_hash, users, senders)
            sandbox_changed = bool(old.get("sandbox")) != entry.sandbox
            bounce_changed = old.get("bounce_domain") != entry.bounce_domain
            if same and not sandbox_changed and not bounce_changed:
                continue
            if not same:
                await self.domains.put(name, key_hash, users, replace=True, senders=senders)
            # Their own writes: a put keeps the domain's sandbox mode and bounce domain.
            if sandbox_changed:
                await self.domains.set_sandbox(name, entry.sandbox)
            if bounce_changed:
                await self.domains.set_bounce_domain(name, entry.bounce_domain)
            self._said("domain", name, not old)
        for name in stored.keys() - {n.lower() for n in config.domains} if self.prune else ():
            await self.domains.remove(name)
            self.report.append(f"domain {name}: removed")

    async def _outboxes(self, config: ConfigFile) -> None:
        stored = {doc["_id"]: doc for doc in await self.outboxes.find(encrypted=True)}
        for name, entry in config.outboxes.items():
            outbox = entry.outbox(name, self.env)
            old = stored.get(name)
            vault = self.vault if outbox.password is not None else None
            doc = outbox_document(outbox, entry.domain, entry.provider, vault, utcnow())
            if outbox.password is None and entry.password_env is not None and old is not None:
                doc["password"] = old["password"]  # unset in the environment: kept
            if old is None or not self._same_outbox(old, doc, outbox.password is not None):
                await self.outboxes.put(doc, replace=True)
                self._said("outbox", name, old is None)
            if old is None or bool(old.get("active", True)) != entry.active:
                await self.outboxes.set_active(name, entry.active)
        for name in stored.keys() - config.outboxes.keys() if self.prune else ():
            await self.outboxes.remove(name)
            self.report.append(f"outbox {name}: removed")

    def _same_outbox(self, old: Document, new: Document, new_password: bool) -> bool:
        def settings_of(doc: Document) -> dict[str, Any]:
            return {k: v for k, v in doc.items() if k not in _BOOKKEEPING and v is not None}

        if settings_of(old) != settings_of(new):
            return False
        if not new_password:
            return bool(old.get("password")) == bool(new.get("password"))
        assert self.vault is not None  # a new password was just encrypted with it
        return bool(old.get("password")) and self.vault.decrypt(
            old["password"]
        ) == self.vault.decrypt(new["password"])

    def _env(self, variable: str, what: str) -> str:
        value = self.env.get(variable)
        if not value:
            raise ConfigurationError(f"{what}: environment variable {variable} is not set")
        return value

    def _said(self, kind: str, name: str, created: bool) -> None:
        self.report.append(f"{kind} {name}: {'created' if created else 'updated'}")


async def _import(args: argparse.Namespace, settings: Settings) -> int:
    try:
        text = await asyncio.to_thread(Path(args.file).read_text, encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot read {args.file}: {exc.strerror}") from None
    config = load(text)
    async with Mongo.connect(settings) as mongo:
        await mongo.outboxes.ensure_indexes()
        importer = Importer(mongo, Vault.optional(settings), os.environ, args.prune)
        await importer.apply(config)
    print("\n".join(importer.report) or "nothing to change")
    return 0


async def _export(args: argparse.Namespace, settings: Settings) -> int:
    async with Mongo.connect(settings) as mongo:
        text = export(
            await mongo.providers.find(),
            await mongo.domains.find(),
            await mongo.outboxes.find(encrypted=True),  # export says if one is set
        )
    if args.out:
        await asyncio.to_thread(Path(args.out).write_text, text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def add_parser(verbs: Subparsers) -> None:
    """Register ``mailbus config`` and its actions on the top-level subparsers."""
    config = verbs.add_parser(
        "config",
        help="import or export providers, domains and outboxes as TOML",
        description="Keep the configuration in git: `config export` writes providers, "
        "domains and outboxes as TOML, `config import` applies such a file, changing only "
        "what differs (a provider whose limits are unchanged keeps its buckets). Secrets "
        "stay out of the file: an outbox's password_env names the environment variable "
        "holding its password at import time (unset: the stored password is kept); a "
        "domain's key_env does the same for its key, or key_hash keeps the stored hash.",
    )
    actions = config.add_subparsers(dest="config_verb", required=True, metavar="ACTION")
    do_import = actions.add_parser(
        "import",
        help="apply a TOML configuration file",
        description="Create or update every provider, domain and outbox in FILE.",
    )
    do_import.add_argument("file", help="the TOML file")
    do_import.add_argument(
        "--prune",
        action="store_true",
        help="also remove providers, domains and outboxes the file does not name",
    )
    do_import.set_defaults(handler=_import)
    do_export = actions.add_parser(
        "export",
        help="write the configuration as TOML",
        description="Write providers, domains and outboxes as TOML, without secrets.",
    )
    do_export.add_argument("--out", help="write to this file instead of standard output")
    do_export.set_defaults(handler=_export)
