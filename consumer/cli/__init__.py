"""The ``mailbus`` command line."""

from consumer.cli.app import main

__all__ = ["main"]
