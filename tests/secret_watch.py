"""A watch over the whole run's output for the test secrets: SMTP passwords, domain keys,
secret keys and broker passwords the tests hand to mailbus must never come back out.

Tests name their secrets with :func:`watched` (at import for constants, at run time for
generated keys). The watch reads every test's captured output (stdout, stderr, log
records, and a failure's report) and, when the run ends, every log the processes the
tests started wrote under the run's temporary directory. A secret found anywhere fails
the run, naming where.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

# The files under the run's temporary directory that are output: the workers' and
# servers' logs. Other files there (a test's .env or TOML config) hold secrets on purpose.
LOG_SUFFIXES = (".log", ".out")


@dataclass
class Watch:
    """The secrets watched, what was read, and where a secret showed."""

    secrets: set[str] = field(default_factory=set)
    base: Path | None = None
    reports_read: int = 0
    files_read: int = 0
    # Where, and which secret (masked); a dict for order without repeats: a teardown's
    # report carries the sections of the phases before it again.
    found: dict[tuple[str, str], None] = field(default_factory=dict)

    def read(self, where: str, text: str) -> None:
        """Note ``where`` for each watched secret ``text`` contains."""
        for secret in self.secrets:
            if secret in text:
                self.found[where, _masked(secret)] = None


WATCH = Watch()


def watched(secret: str) -> str:
    """Watch ``secret`` for the rest of the run; return it."""
    WATCH.secrets.add(secret)
    return secret


def _masked(secret: str) -> str:
    return secret[:4] + "…"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Read each phase's captured output, and the failure's report if any."""
    WATCH.reports_read += 1
    for section, text in report.sections:
        WATCH.read(f"{report.nodeid} ({section})", text)
    if report.failed:
        WATCH.read(f"{report.nodeid} (failure)", report.longreprtext)


@pytest.fixture(scope="session", autouse=True)
def logs_under(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Where the run's processes write their logs."""
    WATCH.base = tmp_path_factory.getbasetemp()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Read the processes' logs; a secret found anywhere fails the run."""
    for path in sorted(WATCH.base.rglob("*")) if WATCH.base is not None else ():
        if path.suffix in LOG_SUFFIXES and path.is_file():
            WATCH.files_read += 1
            WATCH.read(str(path), path.read_text(errors="replace"))
    if WATCH.found:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say what the watch read, and every place a secret showed."""
    terminalreporter.section("secret watch")
    terminalreporter.write_line(
        f"{len(WATCH.secrets)} secrets watched in {WATCH.reports_read} reports and"
        f" {WATCH.files_read} log files: {len(WATCH.found)} found"
    )
    for where, secret in WATCH.found:
        terminalreporter.write_line(f"SECRET {secret} IN {where}", red=True)
