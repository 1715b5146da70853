"""How the command line prints: aligned tables for people, indented JSON for scripts,
and a command's failure as one line on standard error.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

# What a terminal would act on rather than show (C0 and C1 controls, DEL, line and
# paragraph separators, bidirectional overrides), and lone surrogates, which cannot be
# printed at all. Job ids, subjects and errors come from producers and SMTP peers. JSON
# escapes C0 controls itself, and needs its own line breaks.
_BEYOND_C0 = "\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE = re.compile(f"[\x00-\x1f{_BEYOND_C0}]")
_UNSAFE_IN_JSON = re.compile(f"[{_BEYOND_C0}]")


def terminal_safe(text: str) -> str:
    """``text`` with every character a terminal would act on written as an escape."""
    return _UNSAFE.sub(lambda found: ascii(found.group())[1:-1], text)


def pretty_json(value: Any) -> str:
    """``value`` as indented JSON; times in ISO 8601, anything else unknown as text.
    Characters a terminal would act on are JSON escapes, so the output stays valid JSON.
    """
    text = json.dumps(value, indent=2, ensure_ascii=False, default=_plain)
    return _UNSAFE_IN_JSON.sub(lambda found: f"\\u{ord(found.group()):04x}", text)


def _plain(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def table(rows: Sequence[Sequence[str]]) -> str:
    """Rows (the first is the header) in columns two spaces apart; the last column is not
    padded, so free text there (a subject) keeps its length. Cells are made
    :func:`terminal_safe`.
    """
    rows = [[terminal_safe(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    )


def fail(command: str, message: str, *, code: int = 1) -> int:
    """Print ``mailbus {command}: {message}`` on standard error and return ``code``, the
    exit status, so that a handler can ``return fail(...)``.
    """
    print(f"mailbus {command}: {message}", file=sys.stderr)
    return code
