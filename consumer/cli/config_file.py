"""The TOML form of mailbus's configuration in MongoDB: providers, domains and outboxes.

Kept in git and applied with ``mailbus config import``; ``mailbus config export`` writes
the current state in the same form. Secrets never appear in the file: an outbox's password
comes from the environment variable ``password_env`` names at import time (when it is
unset, the stored password is kept), and a domain's key from ``key_env`` or as the salted
hash the export wrote.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from consumer.core.message import Charset
from consumer.core.outboxes import DEFAULT_SENDMAIL, Outbox, Security
from consumer.core.ratelimit import Limit, parse_limit
from consumer.core.replies import ReplyRule, parse_rules, rules_of
from consumer.errors import ConfigurationError
from consumer.settings import BounceDomain
from consumer.store.documents import Document
from consumer.store.providers import limits_of


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProviderEntry(_Entry):
    """``[providers.NAME]``."""

    limits: list[str] = Field(min_length=1)
    burst: int = Field(1, ge=1)
    # Reply rules in the form ``mailbus provider set --reply`` takes.
    replies: list[str] = []

    def parsed(self) -> list[Limit]:
        """The limits, parsed (a bad one raises :class:`ConfigurationError`)."""
        return [parse_limit(text) for text in self.limits]

    def rules(self) -> tuple[ReplyRule, ...]:
        """The reply rules, parsed (a bad one raises :class:`ConfigurationError`)."""
        return parse_rules(self.replies)


class DomainEntry(_Entry):
    """``[domains."example.com"]``."""

    key_env: str | None = None
    key_hash: str | None = None
    allow_users: list[str] = []
    # The domains its From may be under (`mailbus domain add --sender`); empty: its own.
    senders: list[str] = []
    sandbox: bool = False
    bounce_domain: BounceDomain | None = None


class OutboxEntry(_Entry):
    """``[outboxes.NAME]``."""

    domain: str
    provider: str | None = None
    transport: Literal["smtp", "sendmail"] = "smtp"
    host: str = ""
    port: int | None = None
    security: Security = "starttls"
    username: str | None = None
    password_env: str | None = None
    verify_tls: bool = True
    timeout: float = Field(30.0, gt=0)
    max_connections: int | None = Field(None, ge=1)
    sendmail_path: str = DEFAULT_SENDMAIL
    charset: Charset | None = None
    active: bool = True

    def outbox(self, name: str, env: Mapping[str, str]) -> Outbox:
        """The outbox this entry describes, its password read from ``env`` (None when
        ``password_env`` is not set there: the stored one is then kept).
        """
        if self.transport == "smtp" and not self.host:
            raise ConfigurationError(f"outbox {name}: an smtp outbox needs a host")
        password = env.get(self.password_env) if self.password_env else None
        return Outbox(
            name=name,
            host=self.host,
            port=self.port or (465 if self.security == "tls" else 587),
            security=self.security,
            username=self.username,
            password=SecretStr(password) if password is not None else None,
            verify_tls=self.verify_tls,
            timeout=self.timeout,
            max_connections=self.max_connections,
            transport=self.transport,
            command=self.sendmail_path,
            charset=self.charset,
        )


class ConfigFile(_Entry):
    """The whole file."""

    providers: dict[str, ProviderEntry] = {}
    domains: dict[str, DomainEntry] = {}
    outboxes: dict[str, OutboxEntry] = {}


def load(text: str) -> ConfigFile:
    """Parse and check a configuration file; every problem is a :class:`ConfigurationError`."""
    try:
        config = ConfigFile.model_validate(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"not valid TOML: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigurationError(f"invalid configuration: {problems}") from None
    for name, provider in config.providers.items():
        try:
            provider.parsed()
            provider.rules()
        except ConfigurationError as exc:
            raise ConfigurationError(f"provider {name}: {exc}") from None
    for name, outbox in config.outboxes.items():
        if outbox.provider is not None and outbox.provider not in config.providers:
            raise ConfigurationError(f"outbox {name}: provider {outbox.provider} is not defined")
    return config


def password_variable(outbox: str) -> str:
    """The environment variable an export names for ``outbox``'s password."""
    return "MAILBUS_PASSWORD_" + re.sub(r"[^A-Z0-9]", "_", outbox.upper())


def _provider_entry(doc: Document) -> dict[str, Any]:
    """``[providers.NAME]`` of a stored provider; ``replies`` only when it has rules."""
    entry: dict[str, Any] = {
        "limits": [str(lim) for lim in limits_of(doc)],
        "burst": int(doc.get("burst", 1)),
    }
    if rules := rules_of(doc.get("replies")):
        entry["replies"] = [str(rule) for rule in rules]
    return entry


def export(providers: list[Document], domains: list[Document], outboxes: list[Document]) -> str:
    """The stored configuration as TOML, secrets left out (see the module's docstring)."""
    tree: dict[str, Any] = {
        "providers": {p["_id"]: _provider_entry(p) for p in providers},
        "domains": {
            d["_id"]: _without_none(
                {
                    "key_hash": d.get("key_hash"),
                    "allow_users": d.get("allow_users", []),
                    # Only when some: files exported before senders read the same.
                    "senders": d.get("senders") or None,
                    # Only when on: files exported before sandbox mode read the same.
                    "sandbox": True if d.get("sandbox") else None,
                    "bounce_domain": d.get("bounce_domain"),
                }
            )
            for d in domains
        },
        "outboxes": {o["_id"]: _outbox_entry(o) for o in outboxes},
    }
    return tomli_w.dumps(tree)


def _outbox_entry(doc: Document) -> dict[str, Any]:
    sendmail = doc.get("transport") == "sendmail"
    entry = {
        "domain": doc["domain"],
        "provider": doc.get("provider"),
        "transport": "sendmail" if sendmail else "smtp",
        "active": bool(doc.get("active", True)),
        "timeout": float(doc.get("timeout", 30.0)),
        "max_connections": doc.get("max_connections"),
        "charset": doc.get("charset"),
    }
    if sendmail:
        entry["sendmail_path"] = doc.get("command") or DEFAULT_SENDMAIL
    else:
        entry.update(
            host=doc["host"],
            port=int(doc["port"]),
            security=doc["security"],
            username=doc.get("username"),
            verify_tls=bool(doc.get("verify_tls", True)),
        )
    if doc.get("password"):
        entry["password_env"] = password_variable(doc["_id"])
    return _without_none(entry)


def _without_none(entry: dict[str, Any]) -> dict[str, Any]:
    """TOML has no null: absent means default."""
    return {k: v for k, v in entry.items() if v is not None}
