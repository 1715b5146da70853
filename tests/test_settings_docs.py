"""The operator guide's settings table is the Settings object, field by field.

Every field of :class:`consumer.settings.Settings` has one row, named by its environment
variable; every row names a field; and the default a row shows is the field's default:
the value itself in backticks (a secret's plain value, ``true``/``false``, a number equal
to the field's), or ``unset`` for a field without one (``None``, or an empty list).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from consumer.settings import Settings

GUIDE = Path(__file__).resolve().parent.parent / "deploy" / "README.md"
HEADER = "| variable | default | meaning |"


def table_rows(text: str) -> list[list[str]]:
    """The settings table's rows, each as its cells (stripped)."""
    lines = text.splitlines()
    start = lines.index(HEADER) + 2  # past the header and its |---| line
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        # A cell may hold an escaped pipe (`starttls\|tls`): split only on bare ones.
        cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
        rows.append([cell.strip() for cell in cells])
    return rows


def documented() -> dict[str, str]:
    """Each row's environment variable and its default cell."""
    found: dict[str, str] = {}
    for row in table_rows(GUIDE.read_text()):
        assert len(row) == 3, row
        name = re.fullmatch(r"`(MAILBUS_[A-Z0-9_]+)`", row[0])
        assert name, f"not one variable: {row[0]}"
        assert name[1] not in found, f"twice: {name[1]}"
        found[name[1]] = row[1]
    return found


def env_names() -> dict[str, str]:
    """Each field's environment variable, and the field's name."""
    prefix = Settings.model_config.get("env_prefix", "")
    return {f"{prefix}{field}".upper(): field for field in Settings.model_fields}


def shown(default: Any) -> str | None:
    """How the table shows ``default``: the text in its backticks, None for ``unset``."""
    if default is None or default == []:
        return None
    if isinstance(default, SecretStr):
        return default.get_secret_value()
    if isinstance(default, bool):
        return "true" if default else "false"
    return str(default)


def test_the_table_is_read() -> None:
    rows = documented()
    assert rows["MAILBUS_PREFETCH"] == "`32`"
    assert len(rows) > 50


def test_every_field_has_a_row_and_every_row_a_field() -> None:
    assert sorted(documented()) == sorted(env_names())


@pytest.mark.parametrize("env", sorted(env_names()))
def test_the_documented_default_is_the_fields(env: str) -> None:
    cell = documented().get(env)
    assert cell is not None, f"{env} is not in the table"
    default = Settings.model_fields[env_names()[env]].get_default(call_default_factory=True)
    expected = shown(default)
    if expected is None:
        assert cell.startswith("unset"), cell
        return
    value = re.match(r"`([^`]+)`", cell)
    assert value, f"{env}: the default should open the cell in backticks: {cell}"
    if isinstance(default, int | float) and not isinstance(default, bool):
        assert float(value[1]) == default, cell
    else:
        assert value[1] == expected, cell
