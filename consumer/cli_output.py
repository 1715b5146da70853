"""How the command line prints: aligned tables for people, indented JSON for scripts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any


def pretty_json(value: Any) -> str:
    """``value`` as indented JSON; times in ISO 8601, anything else unknown as text."""
    return json.dumps(value, indent=2, ensure_ascii=False, default=_plain)


def _plain(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def table(rows: Sequence[Sequence[str]]) -> str:
    """Rows (the first is the header) in columns two spaces apart; the last column is not
    padded, so free text there (a subject) keeps its length.
    """
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    )
