"""Counting the MongoDB commands a process sends, by name (PyMongo command monitoring).

Shown as ``mailbus_mongo_commands_total``: the store's share of a mail's cost, which
batching keeps near one command per mail or below.
"""

from __future__ import annotations

from collections import Counter

from pymongo import monitoring


class CommandCounter(monitoring.CommandListener):
    """Counts every command started; read from any thread (a dict copy is atomic)."""

    def __init__(self) -> None:
        self.started_by_name: Counter[str] = Counter()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        """Count one command."""
        self.started_by_name[event.command_name] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        """Nothing: only starts are counted."""

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        """Nothing: only starts are counted."""

    def counts(self) -> dict[str, int]:
        """Commands started so far, by command name."""
        return dict(self.started_by_name)
