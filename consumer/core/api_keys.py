"""A sending domain's API keys, which the REST gateway takes in an ``X-API-KEY`` header
as the old CodeIgniter REST server did: their bounds and their names. Pure.

Each key is stored as a salted hash under a name (given, or the next number), so that one
can be removed, say when it is rotated, without touching the others.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# A domain's keys are all tried against a request's key: few, so a wrong one costs little.
MAX_API_KEYS = 10
MIN_KEY_CHARS = 16
MAX_KEY_CHARS = 256
# Generated keys: secrets.token_urlsafe of this many bytes (43 characters).
GENERATED_KEY_BYTES = 32
_KEY = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what a header carries unchanged
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_MAX_NAME_CHARS = 64


def api_key_problem(key: str) -> str | None:
    """Why ``key`` cannot be an API key, or None when it can."""
    if not MIN_KEY_CHARS <= len(key) <= MAX_KEY_CHARS:
        return f"an API key has {MIN_KEY_CHARS} to {MAX_KEY_CHARS} characters, not {len(key)}"
    if not _KEY.fullmatch(key):
        return "an API key is visible ASCII characters only (no spaces), as a header carries"
    return None


def key_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an API key, or None when it can."""
    if len(name) > _MAX_NAME_CHARS or not _NAME.fullmatch(name):
        return (
            f"an API key's name is up to {_MAX_NAME_CHARS} letters, digits, '.', '_' or "
            "'-', starting with a letter or digit"
        )
    return None


def next_key_name(names: Iterable[str]) -> str:
    """The name of a key added without one: the number after the highest in ``names``."""
    return str(max((int(n) for n in names if n.isascii() and n.isdigit()), default=0) + 1)
