"""The reliability suite: every scenario runs against the real parts, ends in an
:class:`~tests.reliability.accounts.Account`, and the accounts of the run are printed at
the end and written to ``reliability-report.json``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.accounts import Account, write_report

_ACCOUNTS: list[Account] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under this folder carries the ``reliability`` marker."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.reliability)


@pytest.fixture
def ledger() -> Iterator[list[Account]]:
    """Where a scenario records its account (kept for the run's report)."""
    accounts: list[Account] = []
    yield accounts
    _ACCOUNTS.extend(accounts)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print every account of the run and write them out."""
    if not _ACCOUNTS:
        return
    terminalreporter.section("reliability accounts")
    for a in _ACCOUNTS:
        terminalreporter.write_line(
            f"{a.scenario}: published {a.published}, sent {a.sent}, dead {a.dead}"
            f" {a.dead_reasons or ''}, scheduled {a.scheduled}, duplicated {a.duplicated},"
            f" missing {len(a.missing)} {a.notes or ''}"
        )
    path = Path(os.environ.get("RELIABILITY_REPORT", "reliability-report.json"))
    write_report(_ACCOUNTS, path)
    terminalreporter.write_line(f"written to {path}")
