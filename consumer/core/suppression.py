"""Suppression scopes: global (an operator's entry), one domain, or one list of a domain.

A job is held to the global entries, its domain's and, when it is sent for a list, that
list's: an unsubscribe from one domain's newsletter never blocks another domain's mail.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A list (or topic) name as jobs and unsubscribe links carry it.
LIST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Neither a valid address nor a domain nor a list name contains one: the key is unambiguous.
_SEPARATOR = "\n"


@dataclass(frozen=True)
class Scope:
    """Where a suppression applies: everywhere (no domain), a domain, or a domain's list."""

    domain: str | None = None
    list_name: str | None = None

    def __post_init__(self) -> None:
        if self.list_name is not None:
            if self.domain is None:
                raise ValueError("a list belongs to a domain: name the domain too")
            if not LIST_NAME.fullmatch(self.list_name):
                raise ValueError(
                    f"list name {self.list_name!r}: 1-64 letters, digits, '.', '_' or '-'"
                )
        if self.domain is not None:
            object.__setattr__(self, "domain", self.domain.lower())

    def key(self, address: str) -> str:
        """The entry's unique key: the lower-cased address, then its scope."""
        parts = [address.lower(), self.domain, self.list_name]
        return _SEPARATOR.join(p for p in parts if p is not None)

    def describe(self) -> str:
        """``global``, ``example.com`` or ``example.com list news``, for listings and logs."""
        if self.domain is None:
            return "global"
        return self.domain if self.list_name is None else f"{self.domain} list {self.list_name}"


# Operators' entries without a domain: they hold for every job.
GLOBAL = Scope()


def scopes_for(domain: str, list_name: str | None = None) -> tuple[Scope, ...]:
    """The scopes a job for ``domain`` (sent for ``list_name``, if any) is held to."""
    held = [GLOBAL, Scope(domain)]
    if list_name is not None:
        held.append(Scope(domain, list_name))
    return tuple(held)
